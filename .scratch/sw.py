import sys, time, pickle, statistics
from concurrent.futures import ThreadPoolExecutor
from ledger import audit
root_pub, raws = pickle.load(open("/tmp/pa-20000.pkl","rb"))
def aud():
    with ThreadPoolExecutor(2) as ex:
        t=time.perf_counter(); audit.audit([raws], anchor=root_pub, executor=ex); return len(raws)/(time.perf_counter()-t)
for sw in [0.005, 0.001, 0.0002, 0.005]:
    sys.setswitchinterval(sw)
    print(sw, round(statistics.median([aud() for _ in range(3)])))

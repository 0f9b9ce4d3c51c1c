import sys, time, statistics, pickle, os
from concurrent.futures import ThreadPoolExecutor
import nacl.signing
from bench.common import build_signed
from ledger import audit, crypto, records
from ledger.state import LedgerState
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
cache = f"/tmp/pa-{N}.pkl"
if os.path.exists(cache):
    root_pub, raws = pickle.load(open(cache, "rb"))
else:
    root, recs = build_signed(N)
    root_pub, raws = root.public_key, [r.raw for r in recs]
    pickle.dump((root_pub, raws), open(cache, "wb"))
items = []
for raw in raws:
    env = records.parse(raw)
    items.append((root_pub, crypto.RECORD_DOMAIN + env.body_bytes, env.signature))
vk = nacl.signing.VerifyKey(root_pub)
def raw1(part):
    for _, m, s in part:
        vk.verify(m, s)
def rate1():
    t=time.perf_counter(); raw1(items); return len(items)/(time.perf_counter()-t)
def rate2():
    with ThreadPoolExecutor(2) as p:
        t=time.perf_counter()
        fs=[p.submit(raw1, items[i:i+512]) for i in range(0,len(items),512)]
        for f in fs: f.result()
        return len(items)/(time.perf_counter()-t)
def aud():
    with ThreadPoolExecutor(2) as ex:
        t=time.perf_counter()
        audit.audit([raws], anchor=root_pub, executor=ex)
        return len(raws)/(time.perf_counter()-t)
def serial():
    st = LedgerState(root_pub)
    t=time.perf_counter()
    for raw in raws:
        st.apply(raw, prechecked=(root_pub, True))
    return (time.perf_counter()-t)/len(raws)*1e6
res = {}
for name, fn in [("raw1", rate1), ("raw2", rate2), ("audit", aud)]:
    vals=[fn() for _ in range(3)]
    res[name]=statistics.median(vals)
res["serial_us"] = statistics.median([serial() for _ in range(3)])
print({k: round(v,1) for k,v in res.items()}, "ratio", round(res["audit"]/res["raw2"],3))

import time, pickle, statistics
from ledger.state import LedgerState
from ledger import records
root_pub, raws = pickle.load(open("/tmp/pa-20000.pkl","rb"))
def serial():
    st = LedgerState(root_pub)
    t=time.thread_time()
    for raw in raws: st.apply(raw, prechecked=(root_pub, True))
    return (time.thread_time()-t)/len(raws)*1e6
def parse():
    t=time.thread_time()
    for raw in raws: records.parse(raw)
    return (time.thread_time()-t)/len(raws)*1e6
print("serial", round(min(serial() for _ in range(5)),2), "parse", round(min(parse() for _ in range(5)),2))

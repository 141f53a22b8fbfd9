import json, statistics as st
R='bench/results/session21-seeds/mrpc'
O='bench/results/session25/mrpc-order'
def acc(p):
    try: return json.load(open(p))['test_accuracy']
    except Exception: return None
rows=[]
for s in (1,2,3,4,42):
    own = acc(f'{R}/ref-{s}.json') or acc(f'{O}/ref-own-{s}.json')
    ours = acc(f'{R}/ours-{s}.json') or acc(f'{O}/ours-{s}.json')
    our_order = acc(f'{O}/ref-ourorder-{s}.json')
    rows.append((s, own, our_order, ours))
    print(f"seed {s}: reference own order {own}, reference on our order {our_order}, ours {ours}")
def diff(a, b):
    d=[(r[a]-r[b])*100 for r in rows if r[a] is not None and r[b] is not None]
    return len(d), st.mean(d), st.stdev(d)/len(d)**0.5, [round(x,2) for x in d]
print('ours - reference (own orders), points: n %d mean %+.2f se %.2f per seed %s' % diff(3,1))
print('ours - reference on our order, points: n %d mean %+.2f se %.2f per seed %s' % diff(3,2))
print('reference on our order - on its own, points: n %d mean %+.2f se %.2f per seed %s' % diff(2,1))

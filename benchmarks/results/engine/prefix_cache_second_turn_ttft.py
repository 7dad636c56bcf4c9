import time, torch, statistics, json
torch.set_num_threads(2)
from dspark.assembly import build_engine
from dspark.engine import EngineConfig
from dspark.sampling import SamplingParams
from dspark.prompts import load_prompts
from dspark.models.loader import load_transformer, load_tokenizer
model, tok = load_transformer("default"), load_tokenizer("default")
cfg = lambda b: EngineConfig(proposer="ngram", max_batch_size=1, prefix_cache_mib=b, verification={"policy": "fixed"})
engines = {b: build_engine(cfg(b), model=model, tokenizer=tok) for b in (1024, 0)}
res = {1024: [], 0: []}; rows = []
for r in load_prompts(None, limit=40, skip=40)[:8]:
    first = [{"role": "user", "content": r.turns[0]}]
    replies = {b: eng.generate([eng.encode_prompt(messages=first)], SamplingParams(max_tokens=128))[0].text for b, eng in engines.items()}
    assert replies[1024] == replies[0]
    conv = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Please explain that in more detail."}]
    for b, eng in engines.items():
        ids = eng.encode_prompt(messages=conv)
        t = time.perf_counter(); eng.generate([ids], SamplingParams(max_tokens=1)); res[b].append(time.perf_counter() - t)
    rows.append({"second_turn_tokens": len(ids), "ttft_ms_cache": round(res[1024][-1] * 1e3, 1), "ttft_ms_no_cache": round(res[0][-1] * 1e3, 1)})
    print(rows[-1], flush=True)
out = {"rows": rows, "median_ms": {"prefix_cache": round(statistics.median(res[1024]) * 1e3, 1), "off": round(statistics.median(res[0]) * 1e3, 1)}, "hits": engines[1024].prefix_cache.hit_tokens}
print(out["median_ms"], out["hits"])
json.dump(out, open("/tmp/ttft.json", "w"), indent=1)

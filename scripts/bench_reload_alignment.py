"""Are GEMMs on the weights of a `from_pretrained` model (memory-mapped safetensors, unaligned offsets) slower than on
a freshly built model's? Interleaved samples, median of 15, configs/demo, 1 x 256 tokens, 2 threads.

    python scripts/bench_reload_alignment.py
"""
import statistics, time, torch, modeling_sparse_moe
from transformers import AutoConfig, AutoModelForCausalLM
from modeling_sparse_moe.configs import config_path
import tempfile
torch.set_num_threads(2)
FOLDER = tempfile.mkdtemp()
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(config_path("demo"))
fresh = AutoModelForCausalLM.from_config(cfg).eval()
fresh.save_pretrained(FOLDER)
loaded = AutoModelForCausalLM.from_pretrained(FOLDER).eval()
print("unaligned params:", sum(p.data_ptr() % 64 != 0 for p in loaded.parameters()), "of", len(list(loaded.parameters())))
ids = torch.randint(3, cfg.vocab_size, (1, 256))
def run(m):
    t = time.perf_counter()
    with torch.no_grad(): m(ids)
    return time.perf_counter() - t
def train(m):
    t = time.perf_counter()
    m(ids, labels=ids).loss.backward(); m.zero_grad(set_to_none=True)
    return time.perf_counter() - t
for name, fn in (("prefill 256", run), ("fwd+bwd 256", train)):
    a, b = [], []
    for _ in range(3): fn(fresh); fn(loaded)
    for _ in range(15):
        a.append(fn(fresh)); b.append(fn(loaded))
    print(f"{name}: fresh {statistics.median(a)*1e3:.1f} ms, from_pretrained {statistics.median(b)*1e3:.1f} ms, ratio {statistics.median(b)/statistics.median(a):.3f}")

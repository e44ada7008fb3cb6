"""eNTK speed on Hugging Face architectures built from configurations (no weights downloaded):
the default method against ``torch.func`` as users write it, trace mode, float32.

The baseline is the ``torch.func`` recipe for the empirical NTK: per-example Jacobians by
``vmap(jacrev(functional_call))`` over the points (a loop of ``jacrev`` over points where the
model cannot run under ``vmap``: data-dependent code), flattened and contracted
``J J^T``. Where the Jacobians of all points would pass ``--jacobian-gib`` (default 3 GiB),
they are formed in chunks of points and only the diagonal blocks contracted: the time is then
a *lower bound* of the baseline (marked ``>=``, so the ratio is one too). The package's own
``method="jacobian"`` (torch.func underneath, within a memory budget) stands beside it.

Per architecture: the capture route and the parameters (and elements) on the generic route
from ``ntk_plan``, the default method's time on a first call and warm (the median of 3 calls
after it, discovery kept), the baseline's time, their ratio (warm), peak resident memory added
above model and data, and the kernels' relative difference. Each method runs in a fresh
process. ``--float64-check`` adds each float32 kernel's error against the float64 kernel on 8
points (the baseline's own float32 error dominates the relative difference).

    pip install transformers && python benchmarks/hf_models.py [--cases bert_base,gpt2_small]
        [--jacobian-gib 3] [--package-jacobian] [--float64-check]

prints a markdown table (``docs/benchmarks.md`` holds one, headed by the command).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from _harness import JACOBIAN_GIB, measure, relative_error, torch_func

VOCAB = 97


def ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def last_position(out):
    return out.logits[:, -1]


def bert(hidden, heads, n, length, mask=False):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=4 * hidden, num_labels=5, max_position_embeddings=64,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    x = ids(n, length)
    if not mask:
        return model, x, None
    lengths = torch.randint(3, length + 1, (n,), generator=torch.Generator().manual_seed(1))
    attention = (torch.arange(length)[None] < lengths[:, None]).long()
    return model, {"input_ids": x * attention, "attention_mask": attention}, None


def gpt2(hidden, heads, n, length):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=heads, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval(), ids(n, length), last_position


def decoder(kind, n=32, length=8, experts=None):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=32))
    else:
        # experts: how the experts run; "eager" loops over them, F.linear(x, W[e])
        options = {} if experts is None else {"experts_implementation": experts}
        config = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, **options)
        model = tf.MixtralForCausalLM(config)
    return model.eval(), ids(n, length), last_position


def t5(n=32, length=8):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    x = {"input_ids": ids(n, length), "decoder_input_ids": ids(n, 4, seed=1)}
    return T5ForConditionalGeneration(config).eval(), x, last_position


def deberta(n=64, length=8):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, num_labels=5, max_position_embeddings=64,
        relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(config).eval(), ids(n, length), None


def vit(n=64):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=512, num_labels=5,
    )  # fmt: skip
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ViTForImageClassification(config).eval(), x, None


def mamba(n=32, length=8):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=128, state_size=16, num_hidden_layers=2, expand=2,
        use_mambapy=False,
    )  # fmt: skip
    return MambaForCausalLM(config).eval(), ids(n, length), last_position


# name: (description, setup); setups are module-level functions (sent to fresh processes).
def setup_bert_tiny():
    return bert(128, 4, 64, 8)


def setup_bert_tiny_mask():
    return bert(128, 4, 64, 8, mask=True)


def setup_bert_base():
    return bert(768, 12, 64, 32)


def setup_gpt2_tiny():
    return gpt2(128, 4, 32, 8)


def setup_gpt2_small():
    return gpt2(768, 12, 32, 32)


def setup_llama():
    return decoder("llama")


def setup_gemma():
    return decoder("gemma")


def setup_mixtral():
    return decoder("mixtral")


def setup_mixtral_eager():
    return decoder("mixtral", experts="eager")


CASES = {
    "bert_tiny": ("BERT, 2 layers, hidden 128, 4 heads, 5 labels; 64 x 8 tokens", setup_bert_tiny),
    "bert_tiny_mask": ("the same, padded `attention_mask` (lengths 3-8)", setup_bert_tiny_mask),
    "bert_base": ("BERT-base widths: 2 layers, hidden 768, 12 heads, 5 labels; 64 x 32 tokens",
                  setup_bert_base),
    "gpt2_tiny": ("GPT-2, 2 layers, n_embd 128, tied head, C = 97; 32 x 8 tokens",
                  setup_gpt2_tiny),
    "gpt2_small": ("GPT-2 small widths: 2 layers, n_embd 768, 12 heads, tied head, C = 97; "
                   "32 x 32 tokens", setup_gpt2_small),
    "llama": ("Llama, 2 layers, hidden 128, GQA 4/2, C = 97; 32 x 8 tokens", setup_llama),
    "gemma": ("Gemma, 2 layers, hidden 128, C = 97; 32 x 8 tokens", setup_gemma),
    "mixtral": ("Mixtral, 2 layers, hidden 128, 4 experts top-2, C = 97; 32 x 8 tokens",
                setup_mixtral),
    "mixtral_eager": ("the same, `experts_implementation=\"eager\"` (F.linear(x, W[e]))",
                      setup_mixtral_eager),
    "t5": ("T5, 2+2 layers, d_model 128, C = 97 (last decoder position); 32 x 8 tokens", t5),
    "deberta_v2": ("DeBERTa-v2, 2 layers, hidden 128, 5 labels; 64 x 8 tokens", deberta),
    "vit": ("ViT, 2 layers, hidden 128, 32x32 images, patches 8, 5 labels; 64 images", vit),
    "mamba": ("Mamba, 2 layers, hidden 128, C = 97; 32 x 8 tokens", mamba),
}  # fmt: skip


def _entk(model, x, output_fn, method):
    from lightning_entk import empirical_ntk

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return empirical_ntk(model, x, method=method, output_fn=output_fn).detach()


def default(model, x, output_fn):
    return _entk(model, x, output_fn, "auto")


def package_jacobian(model, x, output_fn):
    return _entk(model, x, output_fn, "jacobian")


def first_and_warm(model, x, output_fn):
    """The default method's first call (discovery included) and the median of 3 warm ones."""
    start = time.perf_counter()
    default(model, x, output_fn)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        kernel = default(model, x, output_fn)
        seconds.append(time.perf_counter() - start)
    return first, sorted(seconds)[1], kernel


def plan(model, x, output_fn):
    from lightning_entk import ntk_plan

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        p = ntk_plan(model, x, output_fn=output_fn)
    sizes = dict((k, v.numel()) for k, v in model.named_parameters())
    generic = [r.name for r in p.parameters if r.route == "generic"]
    elements = sum(sizes[g] for g in generic)
    reason = f" ({p.capture_reason[:60]})" if p.capture_reason else ""
    return p.capture + reason, len(generic), len(p.parameters), elements, sum(sizes.values())


def float64_errors(model, x, output_fn, points: int = 8) -> tuple[float, float]:
    """On the first ``points`` points, the relative error of the default method's and of the
    baseline's float32 kernels against the default method's float64 kernel (itself checked
    against a float64 reference in the tests)."""
    import copy

    from torch.utils._pytree import tree_map

    x = tree_map(lambda t: t[:points], x)
    exact = default(copy.deepcopy(model).double(), x, output_fn)
    ours = default(model, x, output_fn)
    theirs, _ = torch_func(model, x, output_fn)
    return relative_error(ours, exact), relative_error(theirs, exact)


def main():
    try:
        import transformers
    except ImportError:
        sys.exit("benchmarks/hf_models.py needs `pip install transformers` (not a dependency).")
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--jacobian-gib", type=float, default=3.0)
    parser.add_argument("--package-jacobian", action="store_true")
    parser.add_argument("--float64-check", action="store_true")
    args = parser.parse_args()
    os.environ[JACOBIAN_GIB] = str(args.jacobian_gib)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()}\n"
    )
    header = ("| model | capture | generic params (elements) | default first | default warm "
              "| torch.func | ratio | default MiB | torch.func MiB | rel diff |")  # fmt: skip
    if args.package_jacobian:
        header += " method='jacobian' |"
    if args.float64_check:
        header += " default vs float64 | torch.func vs float64 |"
    print(header)
    print("|" + "---|" * header.count(" |"))
    for name in args.cases.split(","):
        description, setup = CASES[name]
        model, x, output_fn = setup()
        capture, generic, total, elements, size = plan(model, x, output_fn)
        fast = measure(setup, first_and_warm, repeats=1, warmup=0)
        first, warm, kernel = fast["result"]
        base = measure(setup, torch_func, repeats=1, warmup=0)
        reference, bound = base["result"]
        mark = ">=" if bound else ""
        if bound:  # only the diagonal blocks were formed: compare those
            kernel = torch.where(reference != 0, kernel, 0)
        row = (
            f"| {description} | {capture} | {generic}/{total} ({elements / size:.0%}) "
            f"| {first:.2f} s | {warm:.3f} s | {mark}{base['seconds']:.2f} s "
            f"| {mark}{base['seconds'] / warm:.1f}x | {fast['peak_mib']:.0f} "
            f"| {base['peak_mib']:.0f} | {relative_error(kernel, reference):.1e} |"
        )
        if args.package_jacobian:
            own = measure(setup, package_jacobian, repeats=1, warmup=0)
            row += f" {own['seconds']:.2f} s |"
        if args.float64_check:
            ours, theirs = float64_errors(model, x, output_fn)
            row += f" {ours:.1e} | {theirs:.1e} |"
        print(row, flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

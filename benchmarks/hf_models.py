"""eNTK speed on Hugging Face models people download, built from small configurations (no
weights downloaded): the default method against ``method="jacobian"``, trace mode, float32.

Three cases: ``BertForSequenceClassification`` (2 layers, hidden 128, 4 heads, 5 labels) on 64
sequences of 8 tokens with ``input_ids`` only, and as a dict batch with a padded
``attention_mask`` (lengths 3-8); ``GPT2LMHeadModel`` (2 layers, n_embd 128, vocabulary 97, its
``wte`` tied to the LM head) on 32 sequences, logits at the last position. Per case: the
capture route and parameter routes ``ntk_plan`` reports, wall time, the peak resident memory
added above model and data, and the relative difference of the two kernels.

``transformers`` is not a dependency of the package; run this in an environment that has it:

    pip install transformers && python benchmarks/hf_models.py [--interleave]

Without ``--interleave`` each method runs in a fresh process (median of 3 calls after a warm-up
for the default method, one call for jacobian). With ``--interleave`` both run in one process
alternately (3 calls each after a warm-up call of each), so a load on the machine slows both
alike.
"""

import os
import statistics
import sys
import time
import warnings

import torch

from _harness import measure, relative_error

SEQS, LEN, VOCAB = 64, 8, 97


def bert(mask: bool):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        num_labels=5,
        max_position_embeddings=64,
    )
    model = BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (SEQS, LEN), generator=g)
    if not mask:
        return model, ids
    lengths = torch.randint(3, LEN + 1, (SEQS,), generator=g)
    attention = (torch.arange(LEN)[None] < lengths[:, None]).long()
    return model, {"input_ids": ids * attention, "attention_mask": attention}


def setup_bert():
    return bert(False)


def setup_bert_mask():
    return bert(True)


def setup_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=128,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    ids = torch.randint(0, VOCAB, (SEQS // 2, LEN), generator=torch.Generator().manual_seed(0))
    return model, ids


def last_position(out):
    return out.logits[:, -1]


def output_fn(model):
    """The language model's logits at the last position; the classifier's as they are."""
    return last_position if "GPT2" in type(model).__name__ else None


def _kernel(model, x, method):
    from lightning_entk import empirical_ntk

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return empirical_ntk(model, x, method=method, output_fn=output_fn(model)).detach()


def default(model, x):
    return _kernel(model, x, "auto")


def jacobian(model, x):
    return _kernel(model, x, "jacobian")


def interleaved(model, x):
    calls = {"default": default, "jacobian": jacobian}
    seconds = {k: [] for k in calls}
    kernels = {k: c(model, x) for k, c in calls.items()}
    for _ in range(3):
        for k, c in calls.items():
            start = time.perf_counter()
            kernels[k] = c(model, x)
            seconds[k].append(time.perf_counter() - start)
    return {k: (statistics.median(seconds[k]), kernels[k]) for k in calls}


def plan(model, x):
    from lightning_entk import ntk_plan

    p = ntk_plan(model, x, output_fn=output_fn(model))
    routes = sorted(set(p.routes().values()))
    tied = [r.name for r in p.parameters if r.route == "tied"]
    reason = f" ({p.capture_reason})" if p.capture_reason else ""
    return f"capture {p.capture}{reason}; routes {routes}; tied {tied}"


CASES = {
    "BERT, input_ids only": setup_bert,
    "BERT, padded attention_mask": setup_bert_mask,
    "GPT-2 LM, tied head": setup_gpt2,
}


def main():
    try:
        import transformers
    except ImportError:
        sys.exit("benchmarks/hf_models.py needs `pip install transformers` (not a dependency).")
    interleave = "--interleave" in sys.argv[1:]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()}"
    )
    for name, setup in CASES.items():
        model, x = setup()
        print(f"{name}: {plan(model, x)}", flush=True)
        if interleave:
            both = measure(setup, interleaved, repeats=1, warmup=0)["result"]
            (fs, fk), (ss, sk) = both["default"], both["jacobian"]
            print(
                f"  default {fs:.3f} s, jacobian {ss:.2f} s, ratio {ss / fs:.1f}x, "
                f"rel diff {relative_error(fk, sk):.1e} (interleaved, one process)",
                flush=True,
            )
        else:
            fast = measure(setup, default, repeats=3, warmup=1)
            slow = measure(setup, jacobian, repeats=1, warmup=0)
            print(
                f"  default {fast['seconds']:.3f} s, peak +{fast['peak_mib']:.0f} MiB; "
                f"jacobian {slow['seconds']:.2f} s, peak +{slow['peak_mib']:.0f} MiB; "
                f"ratio {slow['seconds'] / fast['seconds']:.1f}x, "
                f"rel diff {relative_error(fast['result'], slow['result']):.1e} "
                "(each in a fresh process)",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

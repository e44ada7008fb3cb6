"""The engine on tiny random-initialised configurations of the architectures ``transformers``
offers (decoder LMs with RoPE, RMSNorm, grouped-query attention, SwiGLU and sliding windows;
Gemma; a mixture of experts; GPT-2; BLOOM; encoders; an encoder-decoder; vision and audio
models; a state-space model; an RNN-style model), in float64 against the brute-force
reference, and ``ntk_plan``'s routes against those the kernel takes. Built offline from
configurations: no weights are downloaded. Skipped when ``transformers`` is absent."""

import warnings

import pytest
import torch

from lightning_entk import empirical_ntk, ntk_plan
from lightning_entk.kernel import NotDifferentiableError

from reference import brute_force_ntk

tf = pytest.importorskip("transformers")

VOCAB, LEN, N = 24, 6, 3
EXACT = 1e-9  # float64, float32 islands (norms computed in float32) included

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ids(seed: int = 0, length: int = LEN) -> torch.Tensor:
    return torch.randint(1, VOCAB, (N, length), generator=torch.Generator().manual_seed(seed))


def floats(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, *shape, generator=g, dtype=torch.float64)


def last(out) -> torch.Tensor:
    return out.logits[:, -1]


DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=32,
)
ENCODER = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    num_labels=3,
)

# name: (model factory, points, output_fn)
ZOO = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER)), ids, last),
    "mistral": (
        lambda: tf.MistralForCausalLM(tf.MistralConfig(**DECODER, sliding_window=4)),
        ids,
        last,
    ),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DECODER)), ids, last),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DECODER)), ids, last),
    "mixtral": (
        lambda: tf.MixtralForCausalLM(
            tf.MixtralConfig(
                **DECODER,
                num_local_experts=4,
                num_experts_per_tok=2,
                experts_implementation="eager",  # the default grouped_mm has no float64
            )
        ),
        ids,
        last,
    ),
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB,
                n_embd=16,
                n_layer=2,
                n_head=4,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        ids,
        last,
    ),
    "bloom": (
        lambda: tf.BloomForCausalLM(
            tf.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=4)
        ),
        ids,
        last,
    ),
    "bert": (
        lambda: tf.BertForSequenceClassification(
            tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **ENCODER)
        ),
        ids,
        None,
    ),
    "deberta_v2": (
        lambda: tf.DebertaV2ForSequenceClassification(
            tf.DebertaV2Config(
                vocab_size=VOCAB,
                max_position_embeddings=32,
                **ENCODER,
                relative_attention=True,
                position_buckets=8,
                pos_att_type=["p2c", "c2p"],
            )
        ),
        ids,
        None,
    ),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=VOCAB,
                d_model=16,
                d_kv=4,
                d_ff=32,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
            )
        ),
        lambda: {"input_ids": ids(), "decoder_input_ids": ids(7, length=3)},
        last,
    ),
    "vit": (
        lambda: tf.ViTForImageClassification(
            tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, **ENCODER)
        ),
        lambda: floats(3, 8, 8),
        None,
    ),
    "swin": (
        lambda: tf.SwinForImageClassification(
            tf.SwinConfig(
                image_size=16,
                patch_size=4,
                num_channels=3,
                embed_dim=8,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=2,
                num_labels=3,
            )
        ),
        lambda: floats(3, 16, 16),
        None,
    ),
    "wav2vec2": (
        lambda: tf.Wav2Vec2ForSequenceClassification(
            tf.Wav2Vec2Config(
                **ENCODER,
                conv_dim=(8, 8),
                conv_stride=(4, 4),
                conv_kernel=(8, 4),
                num_conv_pos_embeddings=4,
                num_conv_pos_embedding_groups=2,
            )
        ),
        lambda: floats(200),
        None,
    ),
    "mamba": (
        lambda: tf.MambaForCausalLM(
            tf.MambaConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                state_size=4,
                num_hidden_layers=2,
                expand=2,
                conv_kernel=3,
                time_step_rank=4,
                use_mambapy=False,
            )
        ),
        ids,
        last,
    ),
}


def build(name):
    make_model, make_points, output_fn = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model().double().eval()
    return model, make_points(), output_fn


@pytest.mark.parametrize("name", list(ZOO))
def test_empirical_ntk_matches_brute_force_on_hugging_face_architectures(name):
    model, x, output_fn = build(name)
    options = {} if output_fn is None else {"output_fn": output_fn}
    planned = ntk_plan(model, x, **options)
    kernel = empirical_ntk(model, x, mode="full", **options)
    reference = brute_force_ntk(model, x, mode="full", output_fn=output_fn)
    assert ((kernel - reference).norm() / reference.norm()).item() < EXACT
    taken = ntk_plan(model, x, **options)  # from what the kernel's call learned
    assert (taken.routes(), taken.capture) == (planned.routes(), planned.capture)


def rwkv():
    config = tf.RwkvConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        attention_hidden_size=16,
        intermediate_size=32,
        context_length=16,
    )
    torch.manual_seed(0)
    return tf.RwkvForCausalLM(config).double().eval(), ids()


def test_empirical_ntk_rwkv_with_its_cache_raises_naming_forward_fn():
    """RWKV's eval-mode forward writes its state in place (``use_cache=True`` by default)."""
    model, x = rwkv()
    with pytest.raises(NotDifferentiableError, match=r"use_cache=False"):
        empirical_ntk(model, x, output_fn=last)


def test_empirical_ntk_rwkv_without_its_cache_matches_brute_force():
    model, x = rwkv()

    def forward_fn(m, points):
        return m(points, use_cache=False).logits[:, -1]

    kernel = empirical_ntk(model, x, mode="full", forward_fn=forward_fn)
    reference = brute_force_ntk(model, x, mode="full", forward_fn=forward_fn)
    assert ((kernel - reference).norm() / reference.norm()).item() < EXACT

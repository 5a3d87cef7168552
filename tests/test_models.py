"""Model families, shared layers and the checkpoint loader, checked against transformers (test-only).

Every architecture's full-sequence logits must equal transformers' own in float32 on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import ARCHS
from tureen.errors import ModelLoadError, UnsupportedArchitectureError
from tureen.executor.attention import Workspace, build_attention_metadata, paged_attention, write_kv
from tureen.executor.cpu_kernels import load_cpu_ops
from tureen.executor.loader import load_hf_config, load_model, model_args, resolve_checkpoint, resolve_dtype
from tureen.executor.models.layers import DecoderArgs, rope_inv_freq
from tureen.executor.models.registry import model_module, supported_architectures
from tureen.executor.quantization import LinearBackend
from tureen.executor.quantization.factory import linear_method_factory

CPU = torch.device("cpu")


def save_tiny(out_dir: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A tiny random transformers checkpoint without tokenizer (enough for logits tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**cfg, **overrides}),
                                             dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def tureen_logits(model_dir: Path, ids: list[int], dtype: torch.dtype = torch.float32, block_size: int = 4,
                  start_blocks: int = 3, native: bool = False) -> torch.Tensor:
    """Full-sequence logits of one prompt through tureen's paged model (non-contiguous blocks);
    ``native``: on the native CPU kernels, the native GEMM included."""
    linear = None
    if native:
        ops = load_cpu_ops("on", CPU, dtype, model_args(load_hf_config(model_dir)).head_dim)
        linear = linear_method_factory(LinearBackend("native", ops))
    model = load_model(model_dir, load_hf_config(model_dir), CPU, dtype, linear)
    if native:
        model.use_cpu_ops(ops)
    n_blocks = -(-len(ids) // block_size)
    blocks = [start_blocks + 2 * i for i in range(n_blocks)][::-1]  # reversed, with holes
    caches = [torch.zeros(2, start_blocks + 2 * n_blocks, block_size, model.num_kv_heads, model.head_dim,
                          dtype=dtype) for _ in model.model.layers]
    with torch.inference_mode():
        meta = build_attention_metadata([len(ids)], [0], [blocks], block_size, CPU, Workspace())
        return model.compute_logits(model(torch.tensor(ids), meta.positions, meta, caches))


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# ---- paged attention against a dense reference ------------------------------------------------

def _dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: list[int],
                     window: int | None) -> torch.Tensor:
    """q (n, H, D) at positions q_pos; keys/values (context, Hkv, D) at positions 0.. -> (n, H, D)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # (context, H, D)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) / q.shape[-1] ** 0.5  # (H, n, context)
    key_pos = torch.arange(keys.shape[0])[None, :]
    qp = torch.tensor(q_pos)[:, None]
    visible = (key_pos <= qp) & ((key_pos > qp - window) if window else True)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 2, None), (4, 1, 5), (3, 3, None), (4, 4, 9)])
def test_paged_attention_matches_dense_reference(monkeypatch, heads, kv_heads, window):
    from tureen.executor import attention

    monkeypatch.setattr(attention, "MIN_DECODE_GROUP", 1)  # several padded decode groups
    torch.manual_seed(0)
    d, bs, num_blocks = 8, 4, 64
    cache = torch.zeros(2, num_blocks, bs, kv_heads, d)
    # (start_pos, query_len): decodes first, then a fresh prefill, chunks continuing a prefix
    reqs = [(0, 1), (6, 1), (13, 1), (21, 1), (0, 7), (8, 5), (3, 3), (17, 6)]
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-(s + q) // bs))] for s, q in reqs]
    history = []
    for (s, q), tbl in zip(reqs, tables):  # the earlier tokens' K/V, already in the cache
        k, v = torch.randn(s, kv_heads, d), torch.randn(s, kv_heads, d)
        write_kv(cache, k, v, torch.tensor([tbl[p // bs] * bs + p % bs for p in range(s)], dtype=torch.long))
        history.append((k, v))
    meta = build_attention_metadata([q for _, q in reqs], [s for s, _ in reqs], tables, bs, CPU, Workspace())
    assert len(meta.decode_groups) == 4 and len(meta.prefills) == 4
    total = sum(q for _, q in reqs)
    q, k, v = torch.randn(total, heads, d), torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
    out = paged_attention(q, k, v, cache, meta, window)
    row = 0
    for (s, n), (hk, hv) in zip(reqs, history):
        keys, values = torch.cat([hk, k[row:row + n]]), torch.cat([hv, v[row:row + n]])
        ref = _dense_attention(q[row:row + n], keys, values, list(range(s, s + n)), window)
        torch.testing.assert_close(out[row:row + n], ref, atol=1e-5, rtol=1e-5)
        row += n


# ---- every architecture matches transformers ---------------------------------------------------

@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native-cpu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_sequence_logits_match_transformers(checkpoint_factory, arch, native):
    model_dir = checkpoint_factory(arch)
    vocab = load_hf_config(model_dir)["vocab_size"]
    ids = prompt(40, vocab)  # longer than mistral's sliding window (24)
    ours, ref = tureen_logits(model_dir, ids, native=native), hf_logits(model_dir, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}),
    ("qwen3", {"head_dim": 24, "num_key_value_heads": 1, "attention_bias": True}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
])
def test_variants_match_transformers(tmp_path, model_type, overrides):
    model_dir = save_tiny(tmp_path, model_type, **overrides)
    ids = prompt(30, 128)
    ref = hf_logits(model_dir, ids)
    torch.testing.assert_close(tureen_logits(model_dir, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tureen_logits(model_dir, ids, native=True), ref, atol=1e-4, rtol=1e-4)


def test_sliding_window_changes_the_output(tmp_path):
    """The mistral window really masks: the same weights without a window give other logits."""
    model_dir = save_tiny(tmp_path, "mistral", sliding_window=8)
    ids = prompt(30, 128)
    windowed = tureen_logits(model_dir, ids)
    cfg = load_hf_config(model_dir)
    cfg["sliding_window"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))
    full = tureen_logits(model_dir, ids)
    torch.testing.assert_close(windowed[:8], full[:8])  # inside the window: identical
    assert (windowed[8:] - full[8:]).abs().max() > 1e-2


# ---- config handling ---------------------------------------------------------------------------

def test_hub_style_and_transformers5_rope_configs_agree(checkpoint_factory, tmp_path):
    """Hub checkpoints use top-level rope_theta/rope_scaling; transformers 5 writes rope_parameters."""
    src = checkpoint_factory("llama3")
    hub_dir = tmp_path / "hub-style"
    shutil.copytree(src, hub_dir)
    cfg = load_hf_config(src)
    params = dict(cfg.pop("rope_parameters"))
    assert params["rope_type"] == "llama3"
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}  # old spelling: "type"
    (hub_dir / "config.json").write_text(json.dumps(cfg))
    a, b = DecoderArgs.from_dict(load_hf_config(src)).rope(), DecoderArgs.from_dict(cfg).rope()
    assert (a.rope_type, a.theta) == (b.rope_type, b.theta) == ("llama3", 500000.0)
    torch.testing.assert_close(rope_inv_freq(a)[0], rope_inv_freq(b)[0])
    ids = prompt(20, cfg["vocab_size"])
    torch.testing.assert_close(tureen_logits(hub_dir, ids), tureen_logits(src, ids), atol=0, rtol=0)


def test_config_args_drop_unknown_keys_and_derive_head_dim():
    args = DecoderArgs.from_dict({"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 8,
                                  "num_attention_heads": 4, "vocab_size": 10, "some_new_key": 1})
    assert args.head_dim == 16 and args.num_key_value_heads == 4
    with pytest.raises(ModelLoadError, match="required"):
        DecoderArgs.from_dict({"hidden_size": 64})


def test_unsupported_rope_type_is_a_clear_error():
    args = DecoderArgs.from_dict({"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 8,
                                  "num_attention_heads": 4, "vocab_size": 10,
                                  "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(UnsupportedArchitectureError, match="longrope"):
        rope_inv_freq(args.rope())


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    assert supported_architectures() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                         "Qwen3ForCausalLM"]
    with pytest.raises(UnsupportedArchitectureError) as e:
        model_module({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in supported_architectures():
        assert arch in str(e.value)
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        model_module({"model_type": "falcon"})
    assert model_module({"model_type": "qwen3"}).Model.__name__ == "Qwen3ForCausalLM"  # no architectures key
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedArchitectureError):
        load_model(tmp_path, load_hf_config(tmp_path), CPU, torch.float32)


def test_dtype_resolution():
    assert resolve_dtype("auto", {"torch_dtype": "float16"}, CPU) == torch.float32
    assert resolve_dtype("auto", {"dtype": "float16"}, torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", {"dtype": "bfloat16"}, CPU) == torch.bfloat16
    assert resolve_dtype("auto", {}, CPU) == torch.float32
    assert resolve_dtype("float16", {"dtype": "float32"}, CPU) == torch.float16
    assert resolve_dtype("bfloat16", {"dtype": "float32"}, CPU) == torch.bfloat16


def test_bfloat16_weights_close_to_float32(checkpoint_factory):
    model_dir = checkpoint_factory("qwen2")
    ids = prompt(24, load_hf_config(model_dir)["vocab_size"])
    fp32, bf16 = tureen_logits(model_dir, ids), tureen_logits(model_dir, ids, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32  # logits are always float32
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1)
    assert cos.min() > 0.97


# ---- loader ------------------------------------------------------------------------------------

def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    from transformers import AutoModelForCausalLM

    single = save_tiny(tmp_path / "single", "llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = prompt(16, 128)
    torch.testing.assert_close(tureen_logits(sharded, ids), tureen_logits(single, ids), atol=0, rtol=0)


def test_tied_embeddings_share_one_matrix(checkpoint_factory):
    model_dir = checkpoint_factory("qwen2")  # tie_word_embeddings=True, no lm_head.weight stored
    model = load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_lm_head_means_tied(tmp_path):
    model_dir = save_tiny(tmp_path, "llama", tie_word_embeddings=False)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    model = load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)
    torch.testing.assert_close(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def _rewrite(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_names_it(tmp_path):
    model_dir = save_tiny(tmp_path, "llama")
    _rewrite(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)


def test_unknown_or_misshapen_tensor_names_it(tmp_path):
    model_dir = save_tiny(tmp_path, "llama")
    _rewrite(model_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)
    _rewrite(model_dir, lambda t: (t.pop("model.layers.0.mlp.extra.weight"),
                                   t.update({"model.norm.weight": torch.zeros(3)})))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*\(3,\)"):
        load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)


def test_rotary_inv_freq_buffers_are_ignored(tmp_path):
    model_dir = save_tiny(tmp_path, "llama")
    _rewrite(model_dir, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(model_dir, load_hf_config(model_dir), CPU, torch.float32)


def test_resolve_checkpoint_local_paths_and_offline_hub(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "ckpt", "llama")
    assert resolve_checkpoint(str(model_dir)) == model_dir
    assert resolve_checkpoint(str(model_dir / "config.json")) == model_dir
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf_config(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("tureen-test-org/no-such-model")


def test_runtime_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, tureen.executor.model_runner, tureen.executor.models.llama, "
            "tureen.executor.models.qwen3; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

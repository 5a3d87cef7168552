"""The built-in demo model: a small Llama checkpoint with RANDOM weights, built offline.

tureen must run on a fresh machine with no network. When no model is given it serves this
checkpoint, written here in the real Hugging Face layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) without transformers:

- a byte-level BPE tokenizer (8192 ids) trained with ``tokenizers`` on the source of a fixed list
  of Python standard-library modules, so it is deterministic for a given Python and encodes any
  UTF-8 text, with a ChatML chat template;
- ``LlamaForCausalLM`` weights drawn from N(0, 0.02) with a fixed seed (about 16M parameters).

The text it generates is meaningless. It exists to exercise the engine, the server and the tools.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from tureen.errors import ModelLoadError

logger = logging.getLogger("tureen.demo")

DEMO_MODEL_DIRNAME = "demo-llama-v1"
DEMO_MODEL_NOTICE = ("Using tureen's built-in DEMO model: it has RANDOM weights and produces meaningless text. "
                     "Pass a real checkpoint (a directory or hub id) to get real output.")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, "<|endoftext|>", "<|im_start|>", EOS_TOKEN)  # ids 0..3
VOCAB_SIZE = 8192
SEED = 0

# ChatML. The template writes BOS itself: encode its output with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('unknown role ' ~ message['role'] ~ '; use system, user, assistant or tool') }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] | default('')) + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Training text for the tokenizer: standard-library sources (paths relative to the stdlib folder).
_CORPUS_FILES = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py", "csv.py",
    "dataclasses.py", "difflib.py", "email/message.py", "enum.py", "fractions.py", "functools.py",
    "gettext.py", "heapq.py", "inspect.py", "json/decoder.py", "logging/__init__.py", "pathlib.py",
    "pprint.py", "random.py", "shutil.py", "statistics.py", "string.py", "textwrap.py", "threading.py",
    "typing.py", "_pydecimal.py", "http/client.py", "urllib/parse.py", "tokenize.py",
)

_README = """# tureen demo model (RANDOM WEIGHTS)

This checkpoint was generated locally by tureen (`tureen.demo`). Its weights are RANDOM
(normal, std 0.02, fixed seed): it produces meaningless text. It exists so that tureen runs on a
machine with no network and no model; use a real checkpoint for real output.

- architecture: LlamaForCausalLM, {num_params:,} parameters, float32
- tokenizer: byte-level BPE, {vocab_size} ids, trained on Python standard-library source
- chat template: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`)
"""


def default_cache_dir() -> Path:
    """``$TUREEN_CACHE_DIR``, else ``~/.cache/tureen``."""
    return Path(os.environ.get("TUREEN_CACHE_DIR") or Path.home() / ".cache" / "tureen")


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint's directory, built on first use.

    It is built in a temporary sibling folder and renamed into place, so a reader never sees a
    half-written checkpoint and two racing processes both end up with one complete copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DEMO_MODEL_DIRNAME
    if _is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        if target.exists():  # damaged (files deleted by hand): move it aside, then rebuild
            _discard(target, root)
        logger.warning("Creating the demo model in %s. %s", target, DEMO_MODEL_NOTICE)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_DIRNAME}-", dir=root))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            write_demo_checkpoint(staging)
            os.rename(staging, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_complete(target):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the demo model in {root}: {exc}") from exc
    return target


def write_demo_checkpoint(directory: Path) -> None:
    """Write every file of the demo checkpoint into an existing, empty ``directory``."""
    tokenizer = train_demo_tokenizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = demo_config(vocab_size, tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    num_params = _write_weights(directory / "model.safetensors", config)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(tokenizer))
    _write_json(directory / "config.json", config)
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    _write_json(directory / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"], end_of_text],
                 "pad_token_id": config["pad_token_id"]})
    (directory / "README.md").write_text(_README.format(num_params=num_params, vocab_size=vocab_size),
                                         encoding="utf-8")


def _is_complete(directory: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
    return all((directory / name).is_file() for name in names)


def _discard(directory: Path, root: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_DIRNAME}-trash-", dir=root))
    try:
        os.rename(directory, trash / "old")
    except OSError:
        pass  # another process moved or replaced it already
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------- tokenizer


def _training_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_FILES if (stdlib / name).is_file()]
    if sum(map(len, texts)) < 500_000:
        raise ModelLoadError(f"cannot build the demo tokenizer: Python standard-library sources not found in {stdlib}")
    return texts


def train_demo_tokenizer() -> BackendTokenizer:
    """A byte-level BPE with the four special tokens at ids 0-3; BOS is added on encode."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, bos_id)])
    return tokenizer


def _tokenizer_config(tokenizer: BackendTokenizer) -> dict:
    added = {str(tokenizer.token_to_id(tok)): {"content": tok, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
             for tok in SPECIAL_TOKENS}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
            "pad_token": "<|endoftext|>", "model_max_length": 2048, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}


# --------------------------------------------------------------------------------- model


def demo_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 384,
        "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 64, "hidden_act": "silu", "vocab_size": vocab_size, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": True, "torch_dtype": "float32", "initializer_range": 0.02,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"), "use_cache": True,
    }


def demo_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter names and shapes; the LM head is tied to the embedding, so not stored."""
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_dim, kv_dim = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden), f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden), f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def _write_weights(path: Path, config: dict) -> int:
    """Norm weights are 1, every matrix N(0, 0.02) from a fixed seed. Returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, shape in demo_weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.empty(shape).normal_(0.0, config["initializer_range"], generator=generator)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())

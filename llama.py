"""llama.py: the model layer of picograd, and its main program (`python llama.py`).

Llama 2 and 3 for inference and training, written against picograd the way any user would write it. Read it top
to bottom like llama2.c's run.c: config, weights, the model, tokenizers, sampling, generation, training, CLI.

Loaders and tokenizers need only numpy and the standard library (the `sentencepiece` package is imported lazily,
and only to read `.model` files); the model, generation and training run on picograd Tensors. Checkpoints are
read into numpy float32 arrays under Hugging Face names, and rotary embeddings use the Hugging Face layout
(rotate_half over the two halves of each head), so llama2.c checkpoints have their wq/wk rows permuted once, at
load time.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import functools
import heapq
import json
import math
import os
import re
import signal
import struct
import sys
import sysconfig
import threading
import time
import unicodedata

import numpy as np

import dist
import picograd as pg

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass
class LlamaConfig:
    """Shape and hyper-parameters of a Llama model (the fields of llama2.c's header plus what Llama 3 added)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    head_dim: int | None = None  # None means dim // n_heads; Llama 3.2 and others decouple the two
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or Hugging Face's {"rope_type": "llama3", "factor": ...}
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections (grouped-query attention shares them between heads)."""
        return self.n_kv_heads * self.head_dim

    @property
    def stop_ids(self) -> frozenset:
        """The EOS ids that end generation (Llama 3.1 lists three)."""
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return frozenset(i for i in eos if i is not None)

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Read a Hugging Face config.json dict; raises ValueError for another model_type or a missing key."""
        if "model_type" not in hf:
            raise ValueError("config is missing required key 'model_type'")
        if hf["model_type"] != "llama":
            raise ValueError(f"unsupported model_type {hf['model_type']!r}: only 'llama' is supported")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in hf:
                raise ValueError(f"config is missing required key {key!r}")
        # the model section implements SiLU and bias-free projections only; anything else would load and be wrong
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: only 'silu' is supported")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                raise ValueError(f"unsupported {key}=true: Llama projections here have no bias")
        # transformers 4 writes rope_theta and rope_scaling; transformers 5 folds both into rope_parameters
        rope_theta = hf.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling")
        if hf.get("rope_parameters") is not None:
            params = dict(hf["rope_parameters"])
            rope_theta = params.pop("rope_theta", rope_theta)
            rope_scaling = params
        n_heads = hf["num_attention_heads"]
        return cls(
            dim=hf["hidden_size"],
            hidden_dim=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            head_dim=hf.get("head_dim") or None,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        """A Hugging Face config.json dict (transformers 4 keys, which transformers 5 also reads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }


_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling: dict | None) -> dict | None:
    """Normalize a rope_scaling dict: None or 'default' mean plain RoPE; 'llama3' needs its four numbers."""
    if scaling is None:
        return None
    # older configs spell the key "type" instead of "rope_type"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}: only 'default' and 'llama3' are supported")
    for key in _LLAMA3_ROPE_KEYS:
        if key not in scaling:
            raise ValueError(f"rope_scaling of type 'llama3' is missing required key {key!r}")
    checked = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_KEYS:
        checked[key] = scaling[key]
    return checked


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The head_dim/2 inverse frequencies of rotary embeddings, float32, computed as transformers does."""
    # the exponent is rounded to float32 first, as in transformers, so the result matches it bit for bit
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    if scaling is None:
        return inv_freq
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, and blend smoothly in between, so
    # that a model trained on `original_max_position_embeddings` tokens reaches longer contexts
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    # torch evaluates `number / tensor` as reciprocal(tensor) * number; doing the same keeps us bit-identical
    wavelen = (np.float32(1.0) / inv_freq) * np.float32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    ratio = (np.float32(1.0) / wavelen) * np.float32(old_context_len)
    smooth = ((ratio - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: LlamaConfig, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, float32 [length, head_dim/2] (length defaults to max_seq_len): entry (p, i) is for
    position p, frequency i."""
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = np.arange(config.max_seq_len if length is None else length, dtype=np.float32)
    # the angle is a float32 product, as in transformers and llama2.c; float64 here would not match them
    angles = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(angles), np.sin(angles)


# ----------------------------------------------------------------------------------------------------------------
# weights: numpy float32 arrays under Hugging Face names


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face name and shape of every weight of a Llama model, in llama2.c's reading order per layer."""
    dim = config.dim
    q_dim = config.n_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, dim)}
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (dim,)
        shapes[prefix + "self_attn.q_proj.weight"] = (q_dim, dim)
        shapes[prefix + "self_attn.k_proj.weight"] = (config.kv_dim, dim)
        shapes[prefix + "self_attn.v_proj.weight"] = (config.kv_dim, dim)
        shapes[prefix + "self_attn.o_proj.weight"] = (dim, q_dim)
        shapes[prefix + "post_attention_layernorm.weight"] = (dim,)
        shapes[prefix + "mlp.gate_proj.weight"] = (config.hidden_dim, dim)
        shapes[prefix + "mlp.up_proj.weight"] = (config.hidden_dim, dim)
        shapes[prefix + "mlp.down_proj.weight"] = (dim, config.hidden_dim)
    shapes["model.norm.weight"] = (dim,)
    shapes["lm_head.weight"] = (config.vocab_size, dim)
    return shapes


def _check_weights(config: LlamaConfig, tensors: dict, source: str) -> dict[str, np.ndarray]:
    """Pick the expected tensors out of `tensors`, checking each name and shape; extra tensors are ignored."""
    tensors = dict(tensors)
    # a tied classifier is the embedding itself, whether or not the file also stores a copy
    if config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name} (expected shape {shape})")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise ValueError(f"{source}: tensor {name} has shape {found}, expected {shape}")
        weights[name] = tensors[name]
    return weights


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from interleaved RoPE pairs to Hugging Face's half layout.

    llama2.c (like Meta's original code) rotates adjacent pairs (2i, 2i+1) of each head; Hugging Face rotates
    (i, i + head_dim/2). Moving row 2i+j of each head to row j*head_dim/2 + i makes the two agree, and since q
    and k get the same permutation, attention scores do not change. This is Hugging Face's conversion script.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def load_llama2c(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a llama2.c checkpoint (.bin): a header of 7 int32, then float32 weights grouped by kind.

    Most arrays are read-only views of a memory map of the file; copy one before writing to it."""
    size = os.path.getsize(path)
    if size < 28:
        raise ValueError(f"{path}: {size} bytes is too short for a llama2.c header (28 bytes)")
    with open(path, "rb") as f:
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("<7i", f.read(28))
    header = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
    # llama2.c's convention: a negative vocabulary size means the classifier is stored after the other weights
    shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or dim % n_heads != 0:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {header})")
    config = LlamaConfig(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, max_seq_len=seq_len, norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2)
    head_dim = config.head_dim
    L = n_layers
    # (field, shape) in file order; the two legacy RoPE tables are read and dropped, we compute our own
    layout = [
        ("tok_embeddings", (vocab_size, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, n_heads * head_dim, dim)),
        ("wk", (L, config.kv_dim, dim)),
        ("wv", (L, config.kv_dim, dim)),
        ("wo", (L, dim, n_heads * head_dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden_dim, dim)),
        ("w2", (L, dim, hidden_dim)),
        ("w3", (L, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        layout.append(("wcls", (vocab_size, dim)))
    n_floats = sum(math.prod(shape) for _, shape in layout)
    expected = 28 + 4 * n_floats
    if size != expected:
        raise ValueError(f"{path}: expected {expected} bytes for header {header}, found {size} bytes")
    # a memory map reads only what is used, and keeps a 7B checkpoint from being copied twice
    data = np.asarray(np.memmap(path, dtype="<f4", mode="r", offset=28, shape=(n_floats,)))
    parts = {}
    cursor = 0
    for name, shape in layout:
        count = math.prod(shape)
        parts[name] = data[cursor:cursor + count].reshape(shape)
        cursor += count
    tensors = {"model.embed_tokens.weight": parts["tok_embeddings"], "model.norm.weight": parts["rms_final"]}
    for i in range(L):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = parts["rms_att"][i]
        tensors[prefix + "self_attn.q_proj.weight"] = permute_rope_rows(parts["wq"][i], n_heads)
        tensors[prefix + "self_attn.k_proj.weight"] = permute_rope_rows(parts["wk"][i], n_kv_heads)
        tensors[prefix + "self_attn.v_proj.weight"] = parts["wv"][i]
        tensors[prefix + "self_attn.o_proj.weight"] = parts["wo"][i]
        tensors[prefix + "post_attention_layernorm.weight"] = parts["rms_ffn"][i]
        tensors[prefix + "mlp.gate_proj.weight"] = parts["w1"][i]
        tensors[prefix + "mlp.down_proj.weight"] = parts["w2"][i]
        tensors[prefix + "mlp.up_proj.weight"] = parts["w3"][i]
    if not shared:
        tensors["lm_head.weight"] = parts["wcls"]
    return config, _check_weights(config, tensors, path)


_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a .safetensors file as float32 arrays (F32 straight from a memory map, F16 and BF16 converted).

    Layout: a little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    Every offset is checked, so a corrupt or hostile header raises ValueError instead of reading out of bounds.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        # the reference implementation caps headers at 100 MB; a bigger one is garbage, not a model
        if header_len > min(size - 8, 100_000_000):
            raise ValueError(f"{path}: header length {header_len} does not fit in the {size}-byte file "
                             "(or exceeds the 100 MB limit)")
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype_name = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name!r}; only F32, F16 and BF16 are read")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets):
            raise ValueError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{path}: tensor {name!r} data_offsets {offsets} fall outside the {data_len} data bytes")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype_name].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} of dtype {dtype_name} and shape {shape} needs {nbytes} bytes, "
                             f"its data_offsets span {end - begin}")
        entries.append((begin, end, name, dtype_name, shape))
    # as in the reference implementation, tensors must tile the data exactly: no overlaps, no holes
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin < position:
            raise ValueError(f"{path}: tensor {name!r} at bytes [{begin}, {end}) overlaps the previous tensor")
        if begin > position:
            raise ValueError(f"{path}: bytes [{position}, {begin}) before tensor {name!r} belong to no tensor")
        position = end
    if position != data_len:
        raise ValueError(f"{path}: bytes [{position}, {data_len}) at the end of the file belong to no tensor")
    if data_len == 0:
        data = np.zeros(0, dtype=np.uint8)
    else:
        data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)))
    tensors = {}
    for begin, end, name, dtype_name, shape in entries:
        raw = data[begin:end].view(_SAFETENSORS_DTYPES[dtype_name]).reshape(shape)
        if dtype_name == "F32":
            tensors[name] = raw
        elif dtype_name == "F16":
            tensors[name] = raw.astype(np.float32)
        else:
            # bfloat16 is the top half of a float32
            tensors[name] = (raw.astype(np.uint32) << 16).view(np.float32)
    return tensors


def load_hf(folder: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a Hugging Face Llama folder: config.json and model.safetensors, or shards listed in an index.

    F32 tensors are read-only views of memory maps of the files; copy one before writing to it."""
    with open(os.path.join(folder, "config.json")) as f:
        config = LlamaConfig.from_hf(json.load(f))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single_path = os.path.join(folder, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            # shard names come from a file we did not write: keep them inside the folder
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index_path}: shard name {shard!r} is not a file name in the folder")
            for name, array in _read_safetensors(os.path.join(folder, shard)).items():
                if weight_map.get(name) == shard:
                    tensors[name] = array
    elif os.path.exists(single_path):
        tensors = _read_safetensors(single_path)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(PyTorch .bin checkpoints are pickles and are not read)")
    return config, _check_weights(config, tensors, folder)


def load_checkpoint(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a llama2.c .bin file or a Hugging Face folder."""
    if os.path.isdir(path):
        return load_hf(path)
    return load_llama2c(path)


# ----------------------------------------------------------------------------------------------------------------
# the model


# weights that read the same input, stacked for inference (see Llama.__init__): stacked name -> its parts, in order
STACKED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


class Llama:
    """The Llama transformer (Llama 2 and 3) on picograd Tensors, with a KV cache for generation.

    `model(tokens, start_pos)` runs a batch of token ids through the model, writing their keys and values into the
    cache at start_pos and attending over everything cached before them; `model.decode(token, pos)` does the same
    for one token per sequence through a compiled step; `model.loss(tokens, targets)` is the cache-free causal
    forward pass that training differentiates.
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], device=None, max_seq_len=None,
                 requires_grad=False, mesh=None):
        self.config = config
        # the context window the cache and RoPE tables cover; Llama 3 claims 131072 positions, whose cache alone
        # would need tens of GB, so callers may ask for less
        self.max_seq_len = min(config.max_seq_len, max_seq_len or config.max_seq_len)
        # with a mesh, this process holds one pipeline stage's layers and a tensor-parallel slice of each (weights
        # is then that shard, see shard_weights); without one, the whole model
        self.mesh = mesh
        self.tp = dist.LOCAL if mesh is None else mesh.tp_group
        self.layers = range(config.n_layers) if mesh is None else stage_layers(config, mesh.pp, mesh.pp_rank)
        self.n_heads = config.n_heads // self.tp.size
        self.n_kv_heads = config.n_kv_heads // self.tp.size
        # a tied head is the embedding itself, unless pipeline stages hold the two on different ranks
        tied = config.tie_word_embeddings and "model.embed_tokens.weight" in weights
        # Inference stacks the projections that read the same input (a layer's q, k and v; the MLP's gate and up)
        # into one matrix each, which runs as one product: decode's k and v products alone were too small to reach
        # the memory's bandwidth (2.2 us for 4 MB on the H200) and every product is a launch. The weights keep
        # their names, as views of the stacked matrix. Training keeps them apart: an optimizer updates leaves.
        stacks = {} if requires_grad else {   # stacked name -> its parts' names
            f"model.layers.{i}.{whole}": [f"model.layers.{i}.{part}" for part in parts]
            for i in self.layers for whole, parts in STACKED.items()
            if all(f"model.layers.{i}.{part}" in weights for part in parts)}
        in_stack = {name for parts in stacks.values() for name in parts}
        self.weights = {}
        for name, array in weights.items():
            if name == "lm_head.weight" and tied or name in in_stack:
                continue
            # a contiguous float32 copy: loaders hand out read-only memory maps
            self.weights[name] = pg.Tensor(np.ascontiguousarray(array, dtype=np.float32), device=device,
                                           requires_grad=requires_grad)
        self.stacked = {}   # stacked name -> its matrix
        for whole, parts in stacks.items():
            arrays = [np.asarray(weights[name], dtype=np.float32) for name in parts]
            self.stacked[whole] = pg.Tensor(np.concatenate(arrays), device=device)
            row = 0
            for name, array in zip(parts, arrays):
                self.weights[name] = self.stacked[whole][row:row + array.shape[0]]
                row += array.shape[0]
        if tied:
            # one tensor in both places, so training updates (and differentiates) it as one parameter
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]
        self.device = next(iter(self.weights.values())).device
        cos, sin = rope_tables(config, self.max_seq_len)
        # laid out for rotate(): both halves of a head turn by the same angles
        self.cos = pg.Tensor(np.concatenate([cos, cos], axis=1), device=self.device)
        self.sin = pg.Tensor(np.concatenate([-sin, sin], axis=1), device=self.device)
        self.cache = {}        # per layer, (keys, values) as [batch, n_kv_heads, max_seq_len, head_dim]
        self.cache_batch = 0
        self.decode_step = pg.compile(self._decode_step, max_traces=32)
        self.prefill_step = pg.compile(self._prefill_step, max_traces=32)

    @staticmethod
    def from_pretrained(path: str, device=None, max_seq_len=None) -> Llama:
        """Load a llama2.c .bin checkpoint or a Hugging Face folder (config.json and safetensors)."""
        config, weights = load_checkpoint(str(path))
        return Llama(config, weights, device=device, max_seq_len=max_seq_len)

    @staticmethod
    def init_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
        """Fresh weights for training from scratch: N(0, 0.02) matrices, with the projections that write into the
        residual stream scaled down by sqrt(2 * n_layers) (GPT-2's rule, which keeps its variance from growing
        with depth), and RMSNorm gains of one."""
        rng = np.random.default_rng(seed)
        weights = {}
        for name, shape in weight_shapes(config).items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if len(shape) == 1:
                weights[name] = np.ones(shape, np.float32)
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * config.n_layers)
            weights[name] = (rng.standard_normal(shape) * std).astype(np.float32)
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return weights

    def parameters(self) -> list[pg.Tensor]:
        """The distinct weight tensors (a tied head appears once), in a fixed order."""
        return list(self.state_dict().values())

    def state_dict(self) -> dict[str, pg.Tensor]:
        """Weights under Hugging Face names; a tied head is left out, as transformers saves it."""
        return {name: t for name, t in self.weights.items()
                if not (name == "lm_head.weight" and t is self.weights.get("model.embed_tokens.weight"))}

    # -- the transformer, shared by every entry point; `attend` decides where keys and values come from
    def _transformer(self, tokens: pg.Tensor, cos: pg.Tensor, sin: pg.Tensor, attend, last=None):
        if self.layers != range(self.config.n_layers):
            raise RuntimeError("this model holds one pipeline stage: run it through ParallelTrainer's schedule")
        x = self.embed(tokens)
        for i in self.layers:
            # generation needs only one position's logits (`last`, an int or a pg.Variable): the last layer still
            # writes every position's keys and values to the cache, but attends and runs its MLP for that one
            x = self.block(i, x, cos, sin, attend, last if i == self.layers[-1] else None)
        return self.head(x)

    def embed(self, tokens: pg.Tensor) -> pg.Tensor:
        if tokens.dtype is not pg.int32 or tokens.ndim != 2:
            raise TypeError(f"tokens must be an int32 tensor [batch, seq], got {tokens.dtype.name} {tokens.shape}")
        return self.weights["model.embed_tokens.weight"][tokens]

    def block(self, i: int, x: pg.Tensor, cos: pg.Tensor, sin: pg.Tensor, attend, query=None) -> pg.Tensor:
        """Layer i on the residual stream x [batch, seq, dim]; with `query` (a position's index in seq) only that
        position's output, [batch, 1, dim], its keys and values still coming from every position.

        Under tensor parallelism this rank holds n_heads / tp heads and hidden_dim / tp MLP units:
        copy_to_parallel marks where the replicated stream enters the column-parallel projections (its gradient is
        summed over the group), and all_reduce sums the row-parallel outputs (one all-reduce for attention, one for
        the MLP). Both are the identity without tp."""
        c = self.config
        w = self.weights
        tp = self.tp
        batch, seq = x.shape[0], x.shape[1]
        p = f"model.layers.{i}."
        h = tp.copy_to_parallel(pg.rms_norm(x, w[p + "input_layernorm.weight"], c.norm_eps))
        # contiguous: RoPE reads q and k at two places each, and the scheduler would otherwise fuse (and
        # repeat) the whole matmul into each read
        q, k, v = self.projections(h, p, "self_attn.qkv_proj.weight", contiguous=(True, True, False))
        q = q.reshape(batch, seq, self.n_heads, c.head_dim)
        k = k.reshape(batch, seq, self.n_kv_heads, c.head_dim)
        v = v.reshape(batch, seq, self.n_kv_heads, c.head_dim)
        q = rotate(q, cos, sin)
        if query is not None:
            q, x = q[:, query:query + 1], x[:, query:query + 1]
        out = attend(i, q, rotate(k, cos, sin), v, query)
        out = out.reshape(batch, q.shape[1], self.n_heads * c.head_dim)
        x = x + tp.all_reduce(out @ w[p + "self_attn.o_proj.weight"].T)
        h = tp.copy_to_parallel(pg.rms_norm(x, w[p + "post_attention_layernorm.weight"], c.norm_eps))
        gate, up = self.projections(h, p, "mlp.gate_up_proj.weight")
        return x + tp.all_reduce((gate.silu() * up) @ w[p + "mlp.down_proj.weight"].T)

    def projections(self, h: pg.Tensor, prefix: str, group: str, contiguous=()) -> list[pg.Tensor]:
        """h @ W.T for each weight W of the STACKED group of the layer whose names start with prefix: one product
        and views of its columns when the model stacks the group, else one product each, made contiguous where
        `contiguous` says so (the stacked product always is)."""
        stacked, names = self.stacked.get(prefix + group), [prefix + part for part in STACKED[group]]
        if stacked is None:
            outs = [h @ self.weights[name].T for name in names]
            return [out.contiguous() if keep else out for out, keep in zip(outs, contiguous or [False] * len(outs))]
        product, outs, column = (h @ stacked.T).contiguous(), [], 0
        for name in names:
            rows = self.weights[name].shape[0]
            outs.append(product[..., column:column + rows])
            column += rows
        return outs

    def head(self, x: pg.Tensor) -> pg.Tensor:
        """Logits from the residual stream: the final norm and the (replicated) vocabulary projection."""
        w = self.weights
        return pg.rms_norm(x, w["model.norm.weight"], self.config.norm_eps) @ w["lm_head.weight"].T

    # -- inference: the KV cache
    def _ensure_cache(self, batch: int):
        if self.cache_batch == batch:
            return
        shape = (batch, self.n_kv_heads, self.max_seq_len, self.config.head_dim)
        # realized now, so the compiled decode step sees the cache as long-lived state, not as its own memory
        self.cache = {i: (pg.zeros(shape, device=self.device).contiguous().realize(),
                          pg.zeros(shape, device=self.device).contiguous().realize()) for i in self.layers}
        self.cache_batch = batch

    def _cached(self, layer: int, start, k: pg.Tensor, v: pg.Tensor, keys: int) -> tuple[pg.Tensor, pg.Tensor]:
        """Write k and v [batch, n, kv_heads, head_dim] at positions start.. of the layer's cache, and return its
        first `keys` positions in that layout (views). The cache holds each head's positions together: attention
        over it then reads one stream a head, where position-major it read 256 bytes of every 3 KB (stories110M)."""
        cache_k, cache_v = self.cache[layer]
        n = k.shape[1]
        cache_k[:, :, start:start + n] = k.permute(0, 2, 1, 3)
        cache_v[:, :, start:start + n] = v.permute(0, 2, 1, 3)
        return cache_k[:, :, :keys].permute(0, 2, 1, 3), cache_v[:, :, :keys].permute(0, 2, 1, 3)

    def __call__(self, tokens: pg.Tensor, start_pos: int = 0, last_only: bool = False) -> pg.Tensor:
        """Logits [batch, seq, vocab] for tokens [batch, seq] (int32) at positions start_pos.., through the cache:
        their keys and values are written at start_pos.. and they attend over positions 0..start_pos+seq-1."""
        batch, seq = tokens.shape
        end = start_pos + seq
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit the context window of "
                             f"{self.max_seq_len} tokens")
        self._ensure_cache(batch)
        # query t sits at position start_pos + t and sees keys up to there
        mask = pg.arange(end, device=self.device).reshape(1, end) <= (
            pg.arange(seq, device=self.device).reshape(seq, 1) + start_pos)

        def attend(layer, q, k, v, query=None):
            with pg.no_grad():
                keys, values = self._cached(layer, start_pos, k, v, end)
            return attention(q, keys, values, _query_rows(mask, query))

        return self._transformer(tokens, self.cos[start_pos:end], self.sin[start_pos:end], attend,
                                 seq - 1 if last_only else None)

    def prefill(self, tokens, start_pos: int = 0) -> pg.Tensor:
        """Logits [batch, vocab] after the last of tokens (a list of ids, or int32 [batch, n]) at positions
        start_pos.., their keys and values written to the cache, through a compiled step: the tokens are padded to
        a power-of-two bucket (32 at least), so prompts of similar lengths share one trace and later ones replay
        it. The padding follows the real tokens, where causal attention hides it from them; its cache entries lie
        past the prompt, masked from decoding until each is overwritten by the token decoded there."""
        ids = np.asarray(tokens.numpy() if isinstance(tokens, pg.Tensor) else tokens, dtype=np.int32)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        batch, n = ids.shape
        bucket = max(32, 1 << (n - 1).bit_length())
        if n == 0 or start_pos < 0 or start_pos + bucket > self.max_seq_len:
            # no room for the padding at the end of the window (or bad positions, which this call reports)
            with pg.no_grad():
                logits = self(pg.Tensor(ids, device=self.device), start_pos, last_only=True)
            return logits.reshape(batch, self.config.vocab_size)
        self._ensure_cache(batch)
        padded = pg.Tensor(np.pad(ids, ((0, 0), (0, bucket - n))), device=self.device)
        ctx = min(max(32, 1 << (start_pos + bucket - 1).bit_length()), self.max_seq_len)
        start = pg.Variable("start", 0, self.max_seq_len - bucket).bind(start_pos)
        with pg.no_grad():
            return self.prefill_step(padded, start, pg.Variable("last", 0, bucket - 1).bind(n - 1), ctx)

    def _prefill_step(self, tokens: pg.Tensor, start: pg.Variable, last: pg.Variable, ctx: int) -> pg.Tensor:
        bucket = tokens.shape[1]
        # query t sits at position start + t and sees keys up to there, of ctx cached ones
        mask = pg.arange(ctx, device=self.device).reshape(1, ctx) <= (
            pg.arange(bucket, device=self.device).reshape(bucket, 1) + start)

        def attend(layer, q, k, v, query=None):
            return attention(q, *self._cached(layer, start, k, v, ctx), _query_rows(mask, query))

        logits = self._transformer(tokens, self.cos[start:start + bucket], self.sin[start:start + bucket], attend,
                                   last)
        return logits.reshape(tokens.shape[0], self.config.vocab_size)

    def _decode_step(self, tokens: pg.Tensor, pos: pg.Variable, ctx: int, greedy: bool = False,
                     coins: pg.Tensor | None = None, first: pg.Variable | None = None,
                     settings: pg.Tensor | None = None) -> pg.Tensor:
        # positions are a runtime Variable and attention spans a fixed ctx keys, masked beyond pos, so one trace
        # serves every position below ctx; ctx doubles as the sequence grows, costing one trace per power of two
        mask = (pg.arange(ctx, device=self.device) <= pos).reshape(1, ctx)

        def attend(layer, q, k, v, query=None):
            return attention(q, *self._cached(layer, pos, k, v, ctx), _query_rows(mask, query))

        logits = self._transformer(tokens, self.cos[pos:pos + 1], self.sin[pos:pos + 1], attend)
        logits = logits.reshape(tokens.shape[0], self.config.vocab_size)
        # greedy and sampled decoding pick the token in the same step: 4 bytes come back to the host instead of the
        # logits (on the GPU the logits' copy and a host argmax took 140 of 2000 us a token), and the next step can
        # read it on the device
        if coins is not None:   # the coins of step pos - first of the call: a one-hot row of [steps, batch, attempts]
            row = (pg.arange(coins.shape[0], device=self.device) == (pos - first)).float().reshape(-1, 1, 1)
            return sample_tokens(logits, (coins * row).sum(0), settings)
        return logits.argmax(-1) if greedy else logits

    def decode(self, tokens, pos: int, greedy: bool = False) -> pg.Tensor:
        """Logits [batch, vocab] for one token per sequence (a list of ids or an int32 tensor [batch, 1]) at
        position pos, through the compiled step; positions before pos must already be in the cache. greedy: the
        most likely token ids [batch] (int32, the first on ties) instead of the logits."""
        tokens, pos_var, ctx = self._decode_args(tokens, pos, 1)
        with pg.no_grad():
            return self.decode_step(tokens, pos_var, ctx, greedy)

    def decode_greedy(self, tokens, pos: int, steps: int) -> tuple[pg.Tensor, pg.Tensor]:
        """`steps` greedy decode steps from position pos (tokens as for decode), each fed the last one's pick on
        the device: the ids picked, [steps, batch] (int32), and the last of them as [batch], ready to feed the
        next call. One chain of the compiled step's replays (CompiledFunction.chain), which the CPU runs in one
        native call: the Python between tokens is paid once per call."""
        tokens, pos_var, ctx = self._decode_args(tokens, pos, steps)
        with pg.no_grad():
            return self.decode_step.chain(steps, tokens, pos_var, ctx, True, feed=0, var="pos")

    def decode_sampled(self, tokens, pos: int, steps: int, sampler: Sampler) -> tuple[pg.Tensor, pg.Tensor]:
        """As decode_greedy, with each step's token drawn by sampler (temperature above 0) on the device: the ids
        drawn, [steps, batch], and the last of them as [batch]. The call's coins go to the device with it, [CHAIN_STEPS,
        batch, attempts] whatever steps is, so that shorter calls replay the same trace."""
        tokens, pos_var, ctx = self._decode_args(tokens, pos, steps)
        coins = np.zeros((CHAIN_STEPS, tokens.shape[0], sampler.attempts), dtype=np.float32)
        coins[:steps] = sampler.coins(steps, tokens.shape[0])
        coins = pg.Tensor(coins, device=self.device)
        first = pg.Variable("first", 0, self.max_seq_len - 1).bind(pos)
        with pg.no_grad():
            return self.decode_step.chain(steps, tokens, pos_var, ctx, False, coins, first,
                                          sampler.settings(self.device), feed=0, var="pos")

    def _decode_args(self, tokens, pos: int, steps: int):
        """The decode step's arguments for positions pos to pos + steps - 1: the tokens as a tensor, the position as
        a Variable, and the context length of the last position, which serves them all (keys past each step's
        position are masked)."""
        if not isinstance(tokens, pg.Tensor):
            tokens = pg.Tensor(np.asarray(tokens, dtype=np.int32).reshape(-1, 1), device=self.device)
        if steps < 1 or not 0 <= pos <= pos + steps - 1 < self.max_seq_len:
            raise ValueError(f"decoding needs steps >= 1 and positions inside the context window of "
                             f"{self.max_seq_len} tokens, got {steps} steps from position {pos}")
        self._ensure_cache(tokens.shape[0])
        ctx = min(max(32, 1 << (pos + steps - 1).bit_length()), self.max_seq_len)
        return tokens, pg.Variable("pos", 0, self.max_seq_len - 1).bind(pos), ctx

    # -- training: no cache, every position attends causally within its own sequence
    def causal(self, seq: int):
        """cos, sin and the attend function of a cache-free causal pass over seq positions."""
        if seq > self.max_seq_len:
            raise ValueError(f"a sequence of {seq} tokens is longer than the context window of {self.max_seq_len}")
        mask = pg.arange(seq, device=self.device).reshape(1, seq) <= pg.arange(seq, device=self.device).reshape(seq, 1)

        def attend(layer, q, k, v, query=None):
            return attention(q, k, v, _query_rows(mask, query))

        return self.cos[:seq], self.sin[:seq], attend

    def logits(self, tokens: pg.Tensor) -> pg.Tensor:
        """Logits [batch, seq, vocab] of a whole sequence from position 0, without touching the cache."""
        return self._transformer(tokens, *self.causal(tokens.shape[1]))

    def loss(self, tokens: pg.Tensor, targets: pg.Tensor) -> pg.Tensor:
        """Mean cross entropy of predicting targets [batch, seq] from tokens [batch, seq]."""
        logits = self.logits(tokens)
        return pg.cross_entropy(logits.reshape(-1, self.config.vocab_size), targets.reshape(-1))

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids=None, on_token=None) -> list[int]:
        """The ids generated after prompt_ids (see generate() in the generation section)."""
        return generate(self, prompt_ids, max_new_tokens, temperature, top_p, seed, stop_ids, on_token)


def rotate(x: pg.Tensor, cos: pg.Tensor, sin: pg.Tensor) -> pg.Tensor:
    """RoPE in Hugging Face's layout: x [batch, seq, heads, head_dim] pairs dimension i with i + head_dim/2 and
    rotates each pair by its angle. cos is [seq, head_dim] (cos, cos) and sin is [seq, head_dim] (-sin, sin), so
    this is transformers' x * cos + rotate_half(x) * sin with rotate_half's sign folded into the table."""
    batch, seq, heads, head_dim = x.shape
    # swapping the halves is a free view; each output reads x at two places (four with slices and a concat),
    # which matters because the scheduler may recompute a fused matmul, or its gradient, once per read
    swapped = x.reshape(batch, seq, heads, 2, head_dim // 2).flip(3).reshape(batch, seq, heads, head_dim)
    return x * cos.reshape(1, seq, 1, head_dim) + swapped * sin.reshape(1, seq, 1, head_dim)


def _query_rows(mask: pg.Tensor, query) -> pg.Tensor:
    """An attention mask [queries, keys] for every query (query None) or for the one at index query."""
    return mask if query is None else mask[query:query + 1]


def attention(q: pg.Tensor, k: pg.Tensor, v: pg.Tensor, mask: pg.Tensor) -> pg.Tensor:
    """softmax(q k^T / sqrt(head_dim), keys where mask is false dropped) v, for q [batch, seq, heads, head_dim] and
    k, v [batch, keys, kv_heads, head_dim]; mask [seq, keys]. Returns [batch, seq, heads, head_dim].

    Grouped-query attention without copying keys: query heads are grouped as [kv_heads, heads/kv_heads] (head h
    uses kv head h // group, as transformers' repeat_kv), and the group axis broadcasts against k and v."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    q = q.reshape(batch, seq, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)     # [b, kv, group, seq, d]
    kt = k.permute(0, 2, 3, 1).unsqueeze(2)                                     # [b, kv, 1, d, keys]
    scores = (q @ kt) * (1.0 / math.sqrt(head_dim))
    scores = pg.where(mask, scores, float("-inf"))
    out = scores.softmax(-1) @ v.permute(0, 2, 1, 3).unsqueeze(2)               # [b, kv, group, seq, d]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, seq, n_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------------
# tokenizers


def _bpe_merge(symbols: list, pair_merge) -> list:
    """Merge adjacent symbols, best pair first, until no adjacent pair merges; returns the merged symbols.

    pair_merge(left, right) returns (priority, merged) or None; the lowest priority merges first and ties go to
    the leftmost pair, which is what llama2.c, sentencepiece and Hugging Face tokenizers all do. A heap with lazy
    invalidation keeps this O(n log n), so a long prompt without pre-tokenization stays fast.
    """
    symbols = list(symbols)
    n = len(symbols)
    next_of = list(range(1, n + 1))
    prev_of = list(range(-1, n - 1))
    alive = [True] * n
    heap = []

    def push(i):
        j = next_of[i]
        if i < 0 or j >= n:
            return
        found = pair_merge(symbols[i], symbols[j])
        if found is not None:
            heapq.heappush(heap, (found[0], i, symbols[i], symbols[j], found[1]))

    for i in range(n - 1):
        push(i)
    while heap:
        _, i, left, right, merged = heapq.heappop(heap)
        j = next_of[i]
        # an entry is stale once either side has merged into something else
        if not alive[i] or j >= n or symbols[i] != left or symbols[j] != right:
            continue
        symbols[i] = merged
        alive[j] = False
        next_of[i] = next_of[j]
        if next_of[j] < n:
            prev_of[next_of[j]] = i
        if prev_of[i] >= 0:
            push(prev_of[i])
        push(i)
    return [symbols[i] for i in range(n) if alive[i]]


class StreamDecoder:
    """Turns token ids into text one at a time, holding back bytes until they complete a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def __call__(self, token_id: int) -> str:
        """Add one token; return the text that is complete so far (possibly "")."""
        tokenizer = self.tokenizer
        if token_id in tokenizer.special_ids:
            return ""
        piece = tokenizer.pieces[token_id]
        # sentencepiece-style decoders drop the space that encoding put in front of the text, and only that one
        # (llama2.c drops it after any BOS; sentencepiece and tokenizers only at the start, which we follow)
        if self._at_start and tokenizer.strip_leading_space and piece.startswith(b" "):
            piece = piece[1:]
        self._at_start = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """The end of the stream: bytes still held back become U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text to token ids and back. Make one with Tokenizer.from_file(path) or Tokenizer.byte_level().

    Every format shares decoding: `pieces[id]` are the bytes a token stands for, `special_ids` decode to nothing,
    and sentencepiece-style vocabularies drop the space that encoding prepended (`strip_leading_space`).
    """

    def __init__(self, pieces: list[bytes], bos_id: int | None, eos_id: int | None, special_ids=(),
                 strip_leading_space: bool = False):
        self.pieces = pieces
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.special_ids = frozenset(special_ids)
        self.strip_leading_space = strip_leading_space
        self.extra_stop_ids = frozenset()

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.pieces)

    @property
    def stop_ids(self) -> frozenset:
        """Ids that end generation: EOS, and BOS, which llama2.c-trained models emit between documents."""
        return frozenset(i for i in (self.bos_id, self.eos_id) if i is not None) | self.extra_stop_ids

    @staticmethod
    def from_file(path: str) -> Tokenizer:
        """Read a tokenizer, choosing the format from the name: llama2.c .bin, Hugging Face .json, sentencepiece
        .model, or a folder holding one of tokenizer.json, tokenizer.model, tokenizer.bin."""
        path = str(path)
        if os.path.isdir(path):
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer.bin"):
                if os.path.exists(os.path.join(path, name)):
                    return Tokenizer.from_file(os.path.join(path, name))
            raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer.model or tokenizer.bin")
        if path.endswith(".json"):
            return HFTokenizer(path)
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        return Llama2cTokenizer(path)

    @staticmethod
    def byte_level() -> ByteTokenizer:
        """The tokenizer for training on raw bytes: ids 0..255 are bytes, 256 is BOS."""
        return ByteTokenizer()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, starting with BOS if `bos`."""
        raise NotImplementedError

    def stream(self) -> StreamDecoder:
        """A decoder for generation: feed it one id at a time, it returns the text completed so far."""
        return StreamDecoder(self)

    def decode(self, ids) -> str:
        """The text of a list of ids; special tokens (BOS, EOS) decode to nothing."""
        stream = self.stream()
        parts = [stream(int(i)) for i in ids]
        parts.append(stream.flush())
        return "".join(parts)


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer.bin: max_token_length int32, then per token a float32 score, int32 length, bytes.

    Encoding is llama2.c's: a dummy-prefix space, one token per UTF-8 character (or its bytes as <0xNN> tokens,
    ids byte+3), then repeatedly merge the adjacent pair whose concatenation is the best-scoring token.
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 4:
            raise ValueError(f"{path}: too short for a llama2.c tokenizer")
        pieces = []
        scores = []
        offset = 4
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(f"{path}: truncated record for token {len(pieces)} at byte {offset}")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ValueError(f"{path}: token {len(pieces)} claims {length} bytes at byte {offset}, "
                                 f"past the end of the {len(data)}-byte file")
            pieces.append(data[offset:offset + length])
            scores.append(score)
            offset += length
        self.scores = scores
        self.vocab = pieces
        self.ids = {}
        for i, piece in enumerate(pieces):
            # keep the first of any duplicate, so the lookup is deterministic
            self.ids.setdefault(piece, i)
        # llama2.c hard-codes <unk>=0, BOS=1, EOS=2; the text of BOS and EOS ("\n<s>\n") is never printed
        decoded = list(pieces)
        for i, piece in enumerate(pieces):
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                decoded[i] = bytes([int(piece[3:5], 16)])
        super().__init__(decoded, bos_id=1, eos_id=2, special_ids=(1, 2), strip_leading_space=True)

    def _pair_merge(self, left: int, right: int):
        merged = self.ids.get(self.vocab[left] + self.vocab[right])
        if merged is None:
            return None
        return (-self.scores[merged], merged)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """llama2.c's encode(): dummy prefix, characters or byte fallback, best-score merges."""
        ids = []
        if text and b" " in self.ids:
            ids.append(self.ids[b" "])
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self.ids:
                ids.append(self.ids[encoded])
            else:
                # +3 skips <unk>, <s>, </s>: the byte tokens <0x00>..<0xFF> follow them in llama2.c vocabularies
                ids.extend(b + 3 for b in encoded)
        ids = _bpe_merge(ids, self._pair_merge)
        if bos:
            ids.insert(0, self.bos_id)
        return ids


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file, through the optional `sentencepiece` package."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"reading {path} needs the optional 'sentencepiece' package (pip install "
                              "sentencepiece); the llama2.c tokenizer.bin or a tokenizer.json need nothing") from e
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        sp = self.sp
        pieces = []
        special = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                pieces.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i):
                pieces.append(b"")
                special.append(i)
            elif sp.is_unknown(i):
                pieces.append(" \u2047 ".encode())  # what sentencepiece itself prints for <unk>
            else:
                pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
        bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        # the model proto says whether a dummy prefix is added; without protobuf, ask the encoder instead
        first = sp.encode("a")
        dummy_prefix = bool(first) and sp.id_to_piece(first[0]).startswith("\u2581")
        super().__init__(pieces, bos_id, eos_id, special_ids=special, strip_leading_space=dummy_prefix)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """sentencepiece's encoding, with BOS in front if `bos`."""
        ids = list(self.sp.encode(text))
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table mapping each byte to a printable character, so byte-level BPE vocabularies are text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}

# Unicode's White_Space property, which is what \s means in the regex engines Hugging Face tokenizers uses
# (Python's str.isspace differs: it also accepts U+001C..U+001F)
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                        "\u200a\u2028\u2029\u202f\u205f\u3000")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def _is_other(c: str) -> bool:
    """[^\\s\\p{L}\\p{N}]: punctuation, symbols, marks, controls."""
    return c not in _WHITESPACE and not _is_letter(c) and not _is_number(c)


LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _match_contraction(text: str, i: int, ignore_case: bool) -> int:
    """End of 's 't 're 've 'm 'll 'd at i, or -1. Case folding maps S and the long s (U+017F) to s."""
    if text[i] != "'":
        return -1
    for suffix in _CONTRACTIONS:
        end = i + 1 + len(suffix)
        if end > len(text):
            continue
        matched = True
        for k, want in enumerate(suffix):
            have = text[i + 1 + k]
            if ignore_case:
                ok = have == want or have == want.upper() or (want == "s" and have == "\u017f")
            else:
                ok = have == want
            if not ok:
                matched = False
                break
        if matched:
            return end
    return -1


def _match_whitespace(text: str, i: int, newline_rule: bool) -> int:
    """End of the whitespace alternatives: \\s*[\\r\\n]+ (Llama 3 only), then \\s+(?!\\S), then \\s+."""
    n = len(text)
    j = i
    while j < n and text[j] in _WHITESPACE:
        j += 1
    if newline_rule:
        # \s*[\r\n]+ backtracks to the last line break of the run and takes everything up to it
        for k in range(j - 1, i - 1, -1):
            if text[k] in "\r\n":
                return k + 1
    # \s+(?!\S): the whole run at the end of the text, otherwise all but the last space, which then goes
    # with the word after it; a run of one falls through to plain \s+
    if j == n or j - 1 == i:
        return j
    return j - 1


def _match_llama3(text: str, i: int) -> int:
    """End of the match of LLAMA3_SPLIT_PATTERN starting at i (alternatives tried in order, as a regex would)."""
    n = len(text)
    c = text[i]
    end = _match_contraction(text, i, ignore_case=True)
    if end >= 0:
        return end
    # [^\r\n\p{L}\p{N}]?\p{L}+
    start = i
    if c not in "\r\n" and not _is_letter(c) and not _is_number(c) and i + 1 < n and _is_letter(text[i + 1]):
        start = i + 1
    if _is_letter(text[start]):
        j = start
        while j < n and _is_letter(text[j]):
            j += 1
        return j
    # \p{N}{1,3}
    if _is_number(c):
        j = i
        while j < n and j - i < 3 and _is_number(text[j]):
            j += 1
        return j
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    start = i + 1 if c == " " and i + 1 < n and _is_other(text[i + 1]) else i
    if _is_other(text[start]):
        j = start
        while j < n and _is_other(text[j]):
            j += 1
        while j < n and text[j] in "\r\n":
            j += 1
        return j
    return _match_whitespace(text, i, newline_rule=True)


def _match_gpt2(text: str, i: int) -> int:
    """End of the match of GPT2_SPLIT_PATTERN starting at i (the ByteLevel pre-tokenizer's use_regex)."""
    n = len(text)
    end = _match_contraction(text, i, ignore_case=False)
    if end >= 0:
        return end
    start = i + 1 if text[i] == " " and i + 1 < n else i
    for is_class in (_is_letter, _is_number, _is_other):
        if is_class(text[start]):
            j = start
            while j < n and is_class(text[j]):
                j += 1
            return j
    return _match_whitespace(text, i, newline_rule=False)


def _split(text: str, match) -> list[str]:
    """Cut `text` into consecutive matches (every character matches some alternative of both patterns)."""
    pieces = []
    i = 0
    while i < len(text):
        j = match(text, i)
        pieces.append(text[i:j])
        i = j
    return pieces


def split_llama3(text: str) -> list[str]:
    """Llama 3's pre-tokenizer: LLAMA3_SPLIT_PATTERN without a regex engine that knows \\p{L} and \\p{N}."""
    return _split(text, _match_llama3)


def split_gpt2(text: str) -> list[str]:
    """GPT-2's pre-tokenizer (GPT2_SPLIT_PATTERN)."""
    return _split(text, _match_gpt2)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json with a BPE model: Llama 2's sentencepiece-style vocabulary (a "▁" prefix,
    byte fallback) or Llama 3's byte-level one (GPT-2's byte-to-unicode table and a split regex).

    The pipeline is the tokenizers package's: split out added tokens, normalize each remaining segment,
    pre-tokenize it into words, BPE each word by merge rank. Only the components those Llamas use are read;
    anything else raises ValueError at load time rather than encoding differently.
    """

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: unsupported tokenizer model {model.get('type')!r}: only BPE is supported")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{path}: BPE subword prefixes and suffixes are not supported")
        self.vocab = dict(model["vocab"])
        self.merges = {}
        for rank, merge in enumerate(model.get("merges") or []):
            # older files write a merge as "left right", newer ones as ["left", "right"]
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2:
                raise ValueError(f"{path}: malformed merge {merge!r}")
            self.merges.setdefault(pair, rank)
        self.byte_fallback = bool(model.get("byte_fallback", False))
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.unk_token = model.get("unk_token")
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.normalizer = spec.get("normalizer")
        self.pre_tokenizer = spec.get("pre_tokenizer")
        self.added = {}
        special = []
        for token in spec.get("added_tokens") or []:
            self.added[token["content"]] = token["id"]
            if token.get("special", False):
                special.append(token["id"])
        # tokenizers matches added tokens leftmost-longest; a regex alternation tries its branches in order, so
        # listing the longest first gives the same matches (lstrip, rstrip and single_word are not supported)
        contents = sorted((content for content in self.added if content), key=len, reverse=True)
        self._added_regex = re.compile("|".join(re.escape(content) for content in contents)) if contents else None
        byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(spec.get("decoder"), "ByteLevel")
        size = 1 + max(list(self.vocab.values()) + list(self.added.values()))
        pieces = [b""] * size
        for token, i in self.vocab.items():
            pieces[i] = _hf_token_bytes(token, byte_level, self.byte_fallback)
        for content, i in self.added.items():
            pieces[i] = content.encode("utf-8")
        bos_id, eos_id = _hf_bos_eos(spec, {**self.vocab, **self.added})
        strip = _mentions(spec.get("decoder"), "Strip") or _metaspace_prepends(spec.get("decoder"))
        super().__init__(pieces, bos_id, eos_id, special_ids=special, strip_leading_space=strip)
        # Llama 3 chat models end a turn with <|eot_id|> (and a tool call with <|eom_id|>), not with EOS
        self.extra_stop_ids = frozenset(self.added[name] for name in ("<|eot_id|>", "<|eom_id|>") if name in self.added)
        # run the pipeline once so an unsupported component fails now, not in the middle of generation
        _pre_tokenize(self.pre_tokenizer, _normalize(self.normalizer, "a b"), first=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """The ids the tokenizers package gives (add_special_tokens=bos, with BOS as the only special token)."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for start, segment, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            normalized = _normalize(self.normalizer, segment)
            for word in _pre_tokenize(self.pre_tokenizer, normalized, first=start == 0):
                ids.extend(self._bpe(word))
        return ids

    def _split_added(self, text: str):
        """Yield (offset, segment, None) for plain text and (offset, content, id) for each added token."""
        start = 0
        if self._added_regex is not None:
            for match in self._added_regex.finditer(text):
                if match.start() > start:
                    yield start, text[start:match.start()], None
                yield match.start(), match.group(), self.added[match.group()]
                start = match.end()
        if start < len(text):
            yield start, text[start:], None

    def _pair_merge(self, left: str, right: str):
        rank = self.merges.get((left, right))
        if rank is None:
            return None
        return (rank, left + right)

    def _bpe(self, word: str) -> list[int]:
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        symbols = []
        for char in word:
            if char in self.vocab:
                symbols.append(char)
                continue
            fallback = [f"<0x{b:02X}>" for b in char.encode("utf-8")]
            if self.byte_fallback and all(token in self.vocab for token in fallback):
                symbols.extend(fallback)
            elif self.unk_token is not None:
                if not (self.fuse_unk and symbols and symbols[-1] == self.unk_token):
                    symbols.append(self.unk_token)
            else:
                raise ValueError(f"character {char!r} is not in the vocabulary and there is no unk_token")
        return [self.vocab[symbol] for symbol in _bpe_merge(symbols, self._pair_merge)]


def _mentions(component, type_name: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) includes one of type `type_name`."""
    if not component:
        return False
    if component.get("type") == type_name:
        return True
    children = component.get("decoders") or component.get("pretokenizers") or component.get("normalizers") or []
    return any(_mentions(child, type_name) for child in children)


def _metaspace_prepends(decoder) -> bool:
    """A Metaspace decoder drops the leading space unless its prepend scheme is 'never'."""
    if not decoder:
        return False
    if decoder.get("type") == "Metaspace":
        return decoder.get("prepend_scheme", "always") != "never" and decoder.get("add_prefix_space", True)
    return any(_metaspace_prepends(child) for child in decoder.get("decoders") or [])


def _hf_token_bytes(token: str, byte_level: bool, byte_fallback: bool) -> bytes:
    """The bytes a vocabulary entry decodes to."""
    if byte_level:
        if all(c in _CHAR_TO_BYTE for c in token):
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        return token.encode("utf-8")
    if byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def _hf_bos_eos(spec: dict, ids: dict) -> tuple[int | None, int | None]:
    """BOS from the post-processor's template when there is one, else from the usual names; EOS by name."""
    bos_id = None
    processor = spec.get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for proc in processors:
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            bos_id = proc["special_tokens"][name]["ids"][0]
    if bos_id is None:
        for name in ("<s>", "<|begin_of_text|>", "<|bos|>"):
            if name in ids:
                bos_id = ids[name]
                break
    eos_id = None
    for name in ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|eos|>"):
        if name in ids:
            eos_id = ids[name]
            break
    return bos_id, eos_id


def _normalize(normalizer, text: str) -> str:
    """Apply a tokenizer.json normalizer: the ones Llama tokenizers use."""
    if not normalizer:
        return text
    kind = normalizer["type"]
    if kind == "Sequence":
        for child in normalizer["normalizers"]:
            text = _normalize(child, text)
        return text
    if kind == "Prepend":
        # tokenizers leaves an empty string empty
        return normalizer["prepend"] + text if text else text
    if kind == "Replace":
        pattern = normalizer["pattern"]
        if "String" not in pattern:
            raise ValueError(f"unsupported Replace normalizer pattern {pattern!r}: only String patterns")
        return text.replace(pattern["String"], normalizer["content"])
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return text.lower()
    raise ValueError(f"unsupported normalizer {kind!r}")


def _pre_tokenize(pre_tokenizer, text: str, first: bool) -> list[str]:
    """Apply a tokenizer.json pre-tokenizer, returning the words BPE sees (byte-level ones already mapped)."""
    if not text:
        return []
    if not pre_tokenizer:
        return [text]
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        words = [text]
        for child in pre_tokenizer["pretokenizers"]:
            words = [piece for word in words for piece in _pre_tokenize(child, word, first)]
        return words
    if kind == "Metaspace":
        replacement = pre_tokenizer.get("replacement", "\u2581")
        scheme = pre_tokenizer.get("prepend_scheme")
        if scheme is None:
            scheme = "always" if pre_tokenizer.get("add_prefix_space", True) else "never"
        text = text.replace(" ", replacement)
        if (scheme == "always" or (scheme == "first" and first)) and not text.startswith(replacement):
            text = replacement + text
        if not pre_tokenizer.get("split", True):
            return [text]
        # each word starts at a replacement character (tokenizers' MergedWithNext)
        words = []
        for char in text:
            if char == replacement or not words:
                words.append(char)
            else:
                words[-1] += char
        return words
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space", False) and not text.startswith(" "):
            text = " " + text
        words = split_gpt2(text) if pre_tokenizer.get("use_regex", True) else [text]
        return ["".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8")) for word in words]
    if kind == "Split":
        pattern = pre_tokenizer["pattern"]
        regex = pattern.get("Regex")
        behavior = pre_tokenizer.get("behavior")
        if behavior != "Isolated" or pre_tokenizer.get("invert", False):
            raise ValueError(f"unsupported Split pre-tokenizer behavior {behavior!r}")
        if regex == LLAMA3_SPLIT_PATTERN:
            return split_llama3(text)
        if regex == GPT2_SPLIT_PATTERN:
            return split_gpt2(text)
        raise ValueError(f"unsupported Split pre-tokenizer pattern {pattern!r}: only Llama 3's and GPT-2's")
    raise ValueError(f"unsupported pre-tokenizer {kind!r}")


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes as tokens (ids 0..255) plus BOS = 256, which also ends a document, as in llama2.c."""

    BOS = 256
    BOS_TEXT = "<|bos|>"

    def __init__(self):
        pieces = [bytes([b]) for b in range(256)] + [b""]
        super().__init__(pieces, bos_id=self.BOS, eos_id=self.BOS, special_ids=(self.BOS,))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """The UTF-8 bytes of `text`, after BOS if `bos`."""
        ids = [self.BOS] if bos else []
        ids.extend(text.encode("utf-8"))
        return ids

    def to_hf(self) -> dict:
        """An equivalent Hugging Face tokenizer.json: byte-level BPE with no merges and BOS as a special token.

        Like any tokenizer.json, it turns the literal text "<|bos|>" into BOS, where encode() keeps its bytes."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        bos = {"SpecialToken": {"id": self.BOS_TEXT, "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": self.BOS, "content": self.BOS_TEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {self.BOS_TEXT: {"id": self.BOS_TEXT, "ids": [self.BOS], "tokens": [self.BOS_TEXT]}},
            },
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {_BYTE_TO_CHAR[b]: b for b in range(256)}, "merges": []},
        }

    def save_hf(self, path: str):
        """Write to_hf() as a tokenizer.json file."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf(), f, ensure_ascii=False, indent=1)


# ----------------------------------------------------------------------------------------------------------------
# sampling: logits -> token ids on the device, so that sampled tokens chain through the decode step as greedy ones do


SAMPLE_BLOCK = 16   # the cumulative distribution is walked in blocks of 16 x 16 probabilities, then 16, then 1


class Sampler:
    """What a generation samples with: temperature 0 is greedy (the first most likely token); otherwise
    softmax(logits / temperature), cut to its nucleus when 0 < top_p < 1 (the smallest set of most likely tokens
    whose probability exceeds top_p, as llama2.c's sampler keeps). The seeded generator draws the coins that
    sample_tokens turns into tokens on the device."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int | None = None):
        if not temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature}")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)
        # A nucleus is drawn by rejection: coins are drawn from the whole distribution until one lands in the
        # nucleus, whose probability exceeds top_p, so each attempt misses with probability below 1 - top_p. This
        # many attempts miss together less than once in a million tokens (at most 64, for top_p under 0.2, where
        # the most likely token alone usually holds more than top_p); then the most likely token is taken.
        nucleus = 0 < top_p < 1
        self.attempts = min(64, math.ceil(math.log(1e-6) / math.log1p(-top_p))) if nucleus else 1

    def settings(self, device: str) -> pg.Tensor:
        """1 / temperature and top_p, as the decode step reads them (runtime values: no trace per setting)."""
        top_p = self.top_p if 0 < self.top_p < 1 else 1.0
        return pg.Tensor(np.float32([1.0 / self.temperature, top_p]), device=device)

    def coins(self, steps: int, batch: int) -> np.ndarray:
        """Uniform coins in [0, 1), [steps, batch, attempts] float32."""
        return self.rng.random((steps, batch, self.attempts), dtype=np.float32)


def sample_tokens(logits: pg.Tensor, coins: pg.Tensor, settings: pg.Tensor) -> pg.Tensor:
    """Token ids [batch] (int32) drawn from logits [batch, vocab] with coins [batch, attempts] and settings (1 /
    temperature, top_p; see Sampler). Each coin picks the token whose slice of the cumulative distribution holds it,
    found in three steps of 16-way running sums (blocks of 256 probabilities, one block's 16 rows, one row), so that
    no step sums more than a few hundred numbers per coin. With more than one attempt, the first token in the
    nucleus is kept: a token is in it when the tokens more likely than it hold at most top_p (so ties with its last
    token all come in, where llama2.c's sort keeps some of them)."""
    batch, vocab = logits.shape
    attempts = coins.shape[1]
    n = SAMPLE_BLOCK
    probs = (logits * settings[0]).softmax(-1)
    blocks = -(-vocab // (n * n))
    rows = probs.pad((0, blocks * n * n - vocab)).reshape(batch, blocks * n, n)
    row_sums = rows.sum(-1).reshape(batch, blocks, n)
    block_cdf = row_sums.sum(-1).cumsum(-1).unsqueeze(1)                             # [batch, 1, blocks]
    block, before = _locate(block_cdf, coins, pg.zeros_like(coins))
    row_cdf = row_sums.gather(1, block.unsqueeze(-1).expand(batch, attempts, n)).cumsum(-1) + before.unsqueeze(-1)
    row, before = _locate(row_cdf, coins, before)
    row = block * n + row
    element_cdf = rows.gather(1, row.unsqueeze(-1).expand(batch, attempts, n)).cumsum(-1) + before.unsqueeze(-1)
    element, _ = _locate(element_cdf, coins, before)
    tokens = (row * n + element).minimum(vocab - 1).realize()
    if attempts == 1:
        return tokens[:, 0]
    picked = probs.gather(1, tokens).unsqueeze(-1)                                        # [batch, attempts, 1]
    wider = probs.unsqueeze(1)                                                            # [batch, 1, vocab]
    more_likely = pg.where(wider > picked, wider, 0.0).sum(-1)                           # [batch, attempts]
    in_nucleus = (more_likely <= settings[1]).int()
    first = tokens.gather(1, in_nucleus.argmax(-1).unsqueeze(-1))[:, 0]
    return pg.where(in_nucleus.max(-1) > 0, first, probs.argmax(-1))


def _locate(cdf: pg.Tensor, coins: pg.Tensor, start: pg.Tensor) -> tuple[pg.Tensor, pg.Tensor]:
    """For each coin [batch, attempts], the index of the first entry of the running sums cdf [batch, attempts (or
    1), n] above it (the last if none is: rounding can leave a total below a coin near 1), and the sum before that
    entry (start, the sum before the first, at index 0). The index is realized: a gather by an index in memory is
    a load (the compiler knows its bounds checked), where one computed in the gather's own kernel became a loop over
    every candidate."""
    n = cdf.shape[-1]
    index = (cdf <= coins.unsqueeze(-1)).int().sum(-1).minimum(n - 1).realize()
    previous = cdf.expand(*coins.shape, n).gather(2, (index - 1).maximum(0).unsqueeze(-1))[..., 0]
    return index, pg.where(index > 0, previous, start)


# ----------------------------------------------------------------------------------------------------------------
# generation


def generate(model: Llama, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop_ids=None, on_token=None) -> list[int]:
    """Continue prompt_ids (at least one id, usually starting with BOS) by up to max_new_tokens ids; returns the
    new ids, without the stop token that ended them.

    The prompt goes through the model in one batched forward pass (prefill), then each sampled token through the
    compiled decode step. Generation stops at a token of stop_ids (default: the config's EOS ids), after
    max_new_tokens, or when the context window is full. on_token(id) is called as each id is chosen, which is how
    the CLI streams text. Timings land in model.timings: prefill and decode tokens and seconds, and the seconds the
    decode calls that traced or built kernels took (left out of the decode rate).
    """
    prompt_ids = [int(i) for i in prompt_ids]
    window = model.max_seq_len
    vocab_size = model.config.vocab_size
    if not prompt_ids:
        raise ValueError("generation needs a prompt of at least one token (usually BOS)")
    if len(prompt_ids) > window:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, longer than the context window of "
                         f"{window} tokens")
    bad = [i for i in prompt_ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    if stop_ids is None:
        stop_ids = model.config.stop_ids
    stop_ids = frozenset(stop_ids)
    sampler = Sampler(temperature, top_p, seed)
    timings = {"prefill_tokens": len(prompt_ids), "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0,
               "compile_s": 0.0}
    model.timings = timings
    start = time.perf_counter()
    logits = model.prefill(prompt_ids)
    with pg.no_grad():
        if sampler.temperature == 0.0:
            token = int(logits.argmax(-1).item())
        else:
            coins = pg.Tensor(sampler.coins(1, 1)[0], device=model.device)
            token = int(sample_tokens(logits, coins, sampler.settings(model.device)).item())
    timings["prefill_s"] = time.perf_counter() - start
    generated = []
    pos = len(prompt_ids)
    # the decode step itself picks each token, so only ids come back to the host, and the next step reads its input
    # token on the device. Each call chains up to CHAIN_STEPS steps, and the call after it is queued before the host
    # waits for its ids, which keeps a GPU busy through the host's own work between calls (one wasted call when a
    # token stops generation)
    picked = []     # ids read back and not yet handed out
    queued = None   # the next call (its last id on the device, the read of all, steps), already queued
    counted = 1     # tokens handed out from a call count towards the decode rate unless the call traced
    while len(generated) < max_new_tokens and token not in stop_ids:
        generated.append(token)
        if on_token is not None:
            on_token(token)
        # the token just chosen sits at `pos`; the cache holds positions up to window - 1
        if len(generated) == max_new_tokens or pos >= window:
            break
        if picked:
            token = picked.pop(0)
            timings["decode_tokens"] += counted
            pos += 1
            continue
        compiling = _compile_counts()
        start = time.perf_counter()
        # this call runs positions pos onwards; the next one continues where it ends, if tokens are left
        last, read, steps = queued or _queue_steps(model, [token], pos, max_new_tokens - len(generated), sampler)
        left = max_new_tokens - len(generated) - steps
        queued = _queue_steps(model, last, pos + steps, left, sampler) if left and pos + steps < window else None
        picked = [int(i) for i in read().reshape(-1)]
        token = picked.pop(0)
        took = time.perf_counter() - start
        counted = int(_compile_counts() == compiling)
        timings["decode_s" if counted else "compile_s"] += took
        timings["decode_tokens"] += counted
        pos += 1
    return generated


def _compile_counts():
    """What a call that traced, or built or loaded kernels, changes: such a call's time is compile time, not decode
    (a step's first call compiles its kernels in graph mode before the second traces)."""
    stats = pg.stats()
    return stats["traces"], stats["kernels_compiled"], stats["kernels_from_disk"]


# Decode steps per call: on the CPU the Python between calls (0.1-0.2 ms, most of it cache misses after the weights
# have streamed through; a stories15M step takes 1.3-1.5 ms) is paid once per call. Longer calls hand out tokens in
# longer bursts and waste more steps when a token stops generation.
CHAIN_STEPS = 8


def _queue_steps(model: Llama, tokens, pos: int, wanted: int, sampler: Sampler):
    """Queue decoding from pos for up to CHAIN_STEPS steps (as many as are wanted and fit in the context window),
    greedy or sampled. Returns (the last id picked, [batch, 1] on the device; a function that waits for all the ids
    on the host; steps)."""
    steps = max(1, min(CHAIN_STEPS, wanted, model.max_seq_len - pos))
    if sampler.temperature == 0.0:
        ids, last = model.decode_greedy(tokens, pos, steps)
    else:
        ids, last = model.decode_sampled(tokens, pos, steps, sampler)
    return last.reshape(-1, 1), ids.numpy_later(), steps


def format_timings(timings: dict) -> str:
    """One line of generation speed: prefill and decode tokens/s, and the time spent compiling."""
    def rate(n, seconds):
        return f"{n / seconds:.1f} tok/s" if seconds > 0 else "n/a"

    return (f"prefill: {timings['prefill_tokens']} tokens, {rate(timings['prefill_tokens'], timings['prefill_s'])}"
            f" | decode: {timings['decode_tokens']} tokens, {rate(timings['decode_tokens'], timings['decode_s'])}"
            f" | tracing and compiling decode steps: {timings['compile_s']:.2f} s")


# ----------------------------------------------------------------------------------------------------------------
# training: a byte-level Llama from scratch, on the standard library's own sources or a text file


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run does besides the model's shape; saved in each checkpoint so --resume repeats it."""

    steps: int = 80              # optimizer steps; with a time budget, the most it may take
    time_budget: float | None = None   # seconds for the training loop: steps are cut to fit after a few are timed
    batch_size: int = 32
    seq_len: int = 64
    accum: int = 1               # micro-batches per optimizer step (gradient accumulation)
    lr: float = 2e-2             # high, as tiny models and short runs allow
    min_lr: float = 2e-3         # where the cosine schedule ends
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0       # on the global gradient norm
    eval_every: int = 0          # validation loss and a checkpoint every so many steps and at the end (0: 5 times)
    eval_batches: int = 4
    seed: int = 0
    data: str | None = None      # a UTF-8 text file; None means the standard library's .py sources


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then a cosine down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def stdlib_sources() -> list[str]:
    """The .py files of the running interpreter's standard library, sorted, without tests and site-packages
    (the test suites are a third of the library and mostly repetitive fixtures)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        files.extend(os.path.join(folder, name) for name in sorted(names) if name.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: this Python ships no standard library sources; "
                                "pass --data")
    return files


@dataclasses.dataclass
class Corpus:
    """Byte-level token streams (BOS between documents) for training and validation."""

    train: np.ndarray
    val: np.ndarray
    description: str


def load_corpus(data: str | None, seq_len: int) -> Corpus:
    """The standard library's sources (every tenth file held out), or a UTF-8 text file (its last tenth held out).

    Raises ValueError for a file that is not UTF-8 or too short for one training sequence."""
    bos = ByteTokenizer.BOS
    need = seq_len + 1
    if data is None:
        files = stdlib_sources()
        chunks = {"train": [], "val": []}
        for i, path in enumerate(files):
            with open(path, "rb") as f:
                # whole files on either side, so validation is code the model has never seen; each document
                # starts with BOS, as generation does
                chunks["val" if i % 10 == 9 else "train"] += [[bos], np.frombuffer(f.read(), dtype=np.uint8)]
        train = np.concatenate(chunks["train"]).astype(np.uint16)
        val = np.concatenate(chunks["val"]).astype(np.uint16)
        size = len(train) + len(val) - len(files)
        return Corpus(train, val, f"{len(files)} standard library files of Python {sys.version.split()[0]} "
                                  f"({size:,} bytes)")
    with open(data, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{data} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None
    stream = np.concatenate([[bos], np.frombuffer(raw, dtype=np.uint8)]).astype(np.uint16)
    if len(stream) < need:
        raise ValueError(f"{data} holds {len(raw)} bytes, {len(stream)} tokens with BOS: fewer than one training "
                         f"sequence of {need} tokens (seq_len {seq_len} + 1); use a bigger file or a smaller "
                         "--seq-len")
    n_val = max(len(stream) // 10, need)
    if len(stream) - n_val < need:
        # too small to hold anything out: validation then measures fitting, which is all such a file allows
        return Corpus(stream, stream, f"{data} ({len(raw):,} bytes, too small for a held-out split)")
    return Corpus(stream[:-n_val], stream[-n_val:], f"{data} ({len(raw):,} bytes)")


def sample_windows(stream: np.ndarray, rng: np.random.Generator, shape: tuple, seq_len: int):
    """Random windows of the stream: (tokens, targets) int32 arrays of shape shape + (seq_len,), targets one
    token ahead."""
    starts = rng.integers(0, len(stream) - seq_len, size=shape)
    windows = stream[starts[..., None] + np.arange(seq_len + 1)]
    return windows[..., :-1].astype(np.int32), windows[..., 1:].astype(np.int32)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats per token) of the validation stream under the training stream's token frequencies
    (add-one smoothed): what a model that ignores context scores, the bar training must clear."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


def _write_atomic(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(folder: str, model: Llama, tokenizer: ByteTokenizer | None = None, optimizer=None,
                    state: dict | None = None) -> bool:
    """Write a Hugging Face folder: config.json, model.safetensors and tokenizer.json, plus optimizer.safetensors
    and trainer_state.json when training. Each file is replaced atomically, trainer_state.json last, so the folder
    never holds a half-written file. Weights that are not all finite are not written (returns False): a diverged
    run must not overwrite its last good checkpoint."""
    weights = {name: t.numpy() for name, t in model.state_dict().items()}
    optimizer_state = None if optimizer is None else optimizer.state_dict()
    return write_checkpoint(folder, model.config, weights, tokenizer, optimizer_state, state)


def write_checkpoint(folder: str, config: LlamaConfig, weights: dict, tokenizer=None, optimizer_state=None,
                     state: dict | None = None) -> bool:
    """save_checkpoint's writer, from arrays: weights {Hugging Face name: array}, optimizer_state as
    AdamW.state_dict() names it."""
    if not all(np.isfinite(w).all() for w in weights.values()):
        return False
    os.makedirs(folder, exist_ok=True)
    _write_atomic(os.path.join(folder, "config.json"), json.dumps(config.to_hf(), indent=1))
    pg.save_safetensors(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        _write_atomic(os.path.join(folder, "tokenizer.json"), json.dumps(tokenizer.to_hf(), ensure_ascii=False))
    if optimizer_state is not None:
        pg.save_safetensors(optimizer_state, os.path.join(folder, "optimizer.safetensors"))
    if state is not None:
        _write_atomic(os.path.join(folder, "trainer_state.json"), json.dumps(state, indent=1))
    return True


def check_writable(folder: str):
    """Fail before training, not at the first checkpoint, if folder cannot hold one."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write checkpoints to {folder}: {e.strerror or e}") from None


class Trainer:
    """Trains a Llama on a Corpus with AdamW: one compiled step does forward, backward, clipping and the update."""

    def __init__(self, model: Llama, cfg: TrainConfig, corpus: Corpus, out: str, log=print):
        self.model, self.cfg, self.corpus, self.out, self.log = model, cfg, corpus, out, log
        self.tokenizer = ByteTokenizer()
        # betas (0.9, 0.95) as most LLM recipes: a shorter second-moment memory tolerates the loss spikes of
        # small batches; one decay rate for every tensor, the norms included, keeps one optimizer
        self.opt = pg.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        self.history = {"train": [], "val": []}   # [step, loss] pairs; train losses are per step
        self.unigram = unigram_loss(corpus.train, corpus.val, model.config.vocab_size)
        # the same validation windows every time, so the curve measures the model and not the draw
        val_rng = np.random.default_rng(cfg.seed + 1)
        self.val_batches = [sample_windows(corpus.val, val_rng, (cfg.batch_size,), cfg.seq_len)
                            for _ in range(cfg.eval_batches)]
        self.train_step = pg.compile(self._train_step)
        self.eval_step = pg.compile(self._eval_step)
        self.stop_requested = False
        self.progress = sys.stdout    # where the progress bar goes

    def _train_step(self, tokens: pg.Tensor, targets: pg.Tensor) -> pg.Tensor:
        # tokens, targets: [accum, batch, seq]; gradients of the micro-batches add up in .grad
        accum = tokens.shape[0]
        total = None
        for i in range(accum):
            loss = self.model.loss(tokens[i], targets[i]) * (1.0 / accum)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        pg.clip_grad_norm_(self.opt.params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad()
        return total

    def _eval_step(self, tokens: pg.Tensor, targets: pg.Tensor) -> pg.Tensor:
        with pg.no_grad():
            return self.model.loss(tokens, targets)

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on tokens and targets [accum, batch, seq]; returns the mean loss."""
        device = self.model.device
        return self.train_step(pg.Tensor(x, device=device), pg.Tensor(y, device=device)).item()

    def stopping(self) -> bool:
        """Whether to stop before the next step (ParallelTrainer makes every rank agree)."""
        return self.stop_requested

    def agree(self, value: float, op: str) -> float:
        """A number every rank must use the same way (ParallelTrainer combines it over ranks with op)."""
        return value

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows."""
        device = self.model.device
        losses = [self.eval_step(pg.Tensor(x, device=device), pg.Tensor(y, device=device)).item()
                  for x, y in self.val_batches]
        return float(np.mean(losses))

    def state(self) -> dict:
        return {"step": self.step, "rng": self.rng.bit_generator.state, "train_config": dataclasses.asdict(self.cfg),
                "history": self.history, "unigram_loss": self.unigram}

    def load_state(self, folder: str):
        """Continue from a checkpoint written by save(): optimizer state, step, data order, history."""
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
        self.opt.load_state_dict(self.read_optimizer(folder))
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]
        self.history = state["history"]

    def read_optimizer(self, folder: str) -> dict:
        saved = pg.load_safetensors(os.path.join(folder, "optimizer.safetensors"), device=self.model.device)
        # the scalars (lr, b1_t, b2_t) come back from pg.load_safetensors as shape (1,); load_state_dict wants ()
        shapes = {name: t.shape for name, t in self.opt.state_dict().items()}
        return {name: t.reshape(shapes.get(name, t.shape)) for name, t in saved.items()}

    def save(self) -> bool:
        return save_checkpoint(self.out, self.model, self.tokenizer, self.opt, self.state())

    def request_stop(self, *_):
        """Finish the current step, save and return (Ctrl-C); a second request stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True

    def run(self, on_step=None) -> str:
        """Train until cfg.steps; returns "done", "interrupted" (Ctrl-C, checkpoint saved) or "diverged" (a
        non-finite loss; the last good checkpoint is left as it was)."""
        cfg = self.cfg
        tokens_per_step = cfg.accum * cfg.batch_size * cfg.seq_len
        bar = ProgressBar(cfg.steps, self.step, self.progress)
        began = time.perf_counter()
        # a time budget is turned into a step count once a few steps are timed, while the warmup still runs, so
        # the cosine schedule knows its length before it starts; the first step (tracing, compiling) is not timed
        timed_from = self.step + 1
        calibrate_at = timed_from + max(1, min(3, cfg.warmup - 1)) if cfg.time_budget else None
        replay_began = None
        # Ctrl-C between kernels would leave half the weights updated: it only asks the loop to stop after a step
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGINT, self.request_stop)
        try:
            while self.step < cfg.steps:
                if self.stopping():
                    bar.close()
                    saved = self.save()
                    where = f"saved to {self.out}" if saved else "not saved (weights are not finite)"
                    self.log(f"interrupted after step {self.step}: checkpoint {where}; continue with "
                             f"`python llama.py train --resume {self.out} --steps {cfg.steps}`")
                    return "interrupted"
                self.opt.lr = lr_at(self.step, cfg)
                x, y = sample_windows(self.corpus.train, self.rng, (cfg.accum, cfg.batch_size), cfg.seq_len)
                start = time.perf_counter()
                loss = self.train_batch(x, y)
                took = time.perf_counter() - start
                if not math.isfinite(loss):
                    bar.close()
                    self.log(f"loss is {loss} at step {self.step + 1}: training stopped; the last good checkpoint "
                             f"in {self.out} (step {self._saved_step()}) is kept")
                    return "diverged"
                self.step += 1
                self.history["train"].append([self.step, loss])
                if self.step == timed_from:
                    replay_began = time.perf_counter()
                elif self.step == calibrate_at:
                    per_step = (time.perf_counter() - replay_began) / (calibrate_at - timed_from)
                    remaining = cfg.time_budget - (time.perf_counter() - began)
                    # a tenth of the budget is left for validation and checkpoints
                    steps = max(self.step, min(cfg.steps, self.step + int(0.9 * remaining / per_step)))
                    cfg.steps = int(self.agree(steps, "min"))
                    bar.total = cfg.steps
                bar.update(self.step, loss, self.opt.lr, tokens_per_step / took)
                if self.step % self.eval_every() == 0 or self.step == cfg.steps:
                    val = self.evaluate()
                    self.history["val"].append([self.step, val])
                    self.save()
                    bar.message(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f} "
                                f"(unigram baseline {self.unigram:.4f})")
                if on_step is not None:
                    on_step(self)
            bar.close()
            return "done"
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

    def eval_every(self) -> int:
        return self.cfg.eval_every or max(1, self.cfg.steps // 5)

    def _saved_step(self):
        try:
            with open(os.path.join(self.out, "trainer_state.json")) as f:
                return json.load(f)["step"]
        except (OSError, ValueError, KeyError):
            return "none written yet"


class ProgressBar:
    """One terminal line redrawn in place (a line every few percent when output is not a terminal)."""

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total, self.stream = total, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.began = time.perf_counter()
        self.first = start
        self.open = False

    def update(self, step, loss, lr, tokens_per_s):
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(1, step - self.first) * (self.total - step)
        filled = int(30 * step / self.total)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * filled}{'.' * (30 - filled)}] "
                f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s eta {eta // 60:.0f}:{eta % 60:02.0f}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.open = True
        elif step % max(1, self.total // 20) == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.open:
            self.stream.write("\n")
            self.open = False


def plot_losses(history: dict, path: str | None = None, baseline: float | None = None, width: int = 64,
                height: int = 14) -> str:
    """The loss curve, with the unigram baseline as a line: a PNG at path when matplotlib is importable (returns
    where it went), else a text plot."""
    train = np.array(history["train"], dtype=np.float64).reshape(-1, 2)
    val = np.array(history["val"], dtype=np.float64).reshape(-1, 2)
    if path is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            pass
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(train[:, 0], train[:, 1], label="train", alpha=0.7)
            if len(val):
                ax.plot(val[:, 0], val[:, 1], "o-", label="validation")
            if baseline is not None:
                ax.axhline(baseline, linestyle="--", color="gray", label="unigram baseline")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats/token)")
            ax.legend()
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            return f"loss curve written to {path}"
    if len(train) == 0:
        return "(no steps to plot)"
    # text plot: one column per bucket of steps, train as '*', validation as 'o', the baseline as '-'
    columns = np.array_split(train, min(width, len(train)))
    means = [chunk[:, 1].mean() for chunk in columns] + list(val[:, 1])
    if baseline is not None:
        means.append(baseline)
    lo = min(means)
    hi = max(means)
    span = max(hi - lo, 1e-9)
    first, last = train[0, 0], train[-1, 0]
    grid = [[" "] * width for _ in range(height)]

    def put(step, loss, char):
        col = 0 if last == first else round((step - first) / (last - first) * (width - 1))
        row = round((hi - loss) / span * (height - 1))
        grid[row][col] = char

    if baseline is not None:
        grid[round((hi - baseline) / span * (height - 1))] = ["-"] * width
    for chunk in columns:
        put(chunk[:, 0].mean(), chunk[:, 1].mean(), "*")
    for step, loss in val:
        put(step, loss, "o")
    lines = [f"{hi - r * span / (height - 1):7.3f} |" + "".join(row) for r, row in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * width)
    lines.append(" " * 9 + f"step {first:.0f}".ljust(width - 10) + f"step {last:.0f}")
    lines.append(" " * 9 + "* train (mean per column)   o validation   - unigram baseline")
    return "\n".join(lines)


def train(cfg: TrainConfig | None = None, model_config: LlamaConfig | None = None, out: str = "runs/llama",
          device=None, resume: str | None = None, steps: int | None = None, log=print, on_step=None, mesh=None,
          bucket_mb: float = 25.0) -> Trainer:
    """Set up and run a training job (the `train` command); bad data or an unwritable `out` fail before any step.

    A new run needs cfg and model_config. resume continues a checkpoint folder with its own saved TrainConfig,
    to its saved step count or to `steps`; the outcome is in the returned trainer's .outcome. With a dist.Mesh,
    this process trains its part of the model (see ParallelTrainer); every rank calls train() alike, rank 0 logs
    and writes the checkpoints."""
    if mesh is not None and mesh.rank != 0:
        def log(*_):
            pass
    if resume is not None:
        with open(os.path.join(resume, "trainer_state.json")) as f:
            saved = json.load(f)
        cfg = TrainConfig(**saved["train_config"])
        # the saved step count is final (any time budget was spent deciding it)
        cfg.time_budget = None
        if steps is not None:
            cfg.steps = steps
        model_config, weights = load_hf(resume)
    elif cfg is None or model_config is None:
        raise ValueError("train() needs a TrainConfig and a LlamaConfig, or a checkpoint folder to resume")
    corpus = load_corpus(cfg.data, cfg.seq_len)
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's context window "
                         f"{model_config.max_seq_len}")
    if mesh is None:
        check_writable(out)
    else:
        check_parallel(model_config, cfg, mesh)
        # rank 0 writes the checkpoints; the others learn whether it can
        problem = ""
        if mesh.rank == 0:
            try:
                check_writable(out)
            except ValueError as e:
                problem = str(e)
        if mesh.world.allreduce_number(float(bool(problem)), "max"):
            raise ValueError(problem or f"cannot write checkpoints to {out} (on rank 0)")
    if resume is None:
        weights = Llama.init_weights(model_config, cfg.seed)
    if mesh is None:
        model = Llama(model_config, weights, device=device, requires_grad=True)
        trainer = Trainer(model, cfg, corpus, out, log=log)
    else:
        model = Llama(model_config, shard_weights(model_config, weights, mesh), device=device, requires_grad=True,
                      mesh=mesh)
        trainer = ParallelTrainer(model, cfg, corpus, out, mesh, log=log, bucket_mb=bucket_mb)
    if resume is not None:
        trainer.load_state(resume)
    n_params = sum(math.prod(shape) for name, shape in weight_shapes(model_config).items()
                   if name in parameter_names(model_config))
    log(f"data: {corpus.description}; {len(corpus.train):,} training and {len(corpus.val):,} validation tokens")
    log(f"model: {n_params:,} parameters (dim {model_config.dim}, {model_config.n_layers} layers, "
        f"{model_config.n_heads} heads, {model_config.n_kv_heads} kv heads, hidden {model_config.hidden_dim}); "
        f"{cfg.accum} x {cfg.batch_size} x {cfg.seq_len} tokens a step on {model.device}, "
        + (f"for {cfg.time_budget:.0f} s (at most {cfg.steps} steps)" if cfg.time_budget else f"{cfg.steps} steps"))
    if mesh is not None:
        log(f"mesh: {mesh.size} processes, pipeline {mesh.pp} x data {mesh.dp} x tensor {mesh.tp} "
            f"({len(trainer.chunks)} gradient bucket{'s' * (len(trainer.chunks) != 1)} on rank 0)")
    log(f"unigram baseline: {trainer.unigram:.4f} nats/token")
    if trainer.step:
        log(f"resuming at step {trainer.step} from {resume}")
    trainer.outcome = trainer.run(on_step)
    return trainer


# ----------------------------------------------------------------------------------------------------------------
# parallel training: `mpiexec -n N python llama.py train --pp P --dp D --tp T` with P * D * T = N
#
# Ranks form a (pipeline, data, tensor) mesh (dist.py; tensor-fastest rank order). A pipeline stage holds a run of
# consecutive layers, the first stage also the embedding and the last the final norm and head. Tensor
# parallelism splits each layer Megatron-style (Llama.block): q, k, v, gate and up are column-parallel (each rank
# holds whole heads and a slice of the MLP units), o and down row-parallel, summed by one all-reduce each. The
# embedding, the norms and the head are replicated: every tensor-parallel rank computes the whole head, which
# keeps the loss an ordinary cross entropy and costs the head's FLOPs on every rank. Data parallel replicas take
# batch_size / dp rows of every micro-batch and sum their gradients, bucketed (one flat buffer per run of layers)
# and started while the backward pass of earlier layers still runs. Micro-batches (--accum) flow through the
# stages in a 1F1B schedule (ParallelTrainer._train_step). A checkpoint is one ordinary Hugging Face folder,
# gathered to rank 0, whatever the mesh; any mesh (or one process) can load it.

# the axis of each layer weight that tensor parallelism splits (absent: replicated)
TP_SPLIT = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 0, "self_attn.v_proj.weight": 0,
            "self_attn.o_proj.weight": 1, "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0,
            "mlp.down_proj.weight": 1}


def stage_layers(config: LlamaConfig, pp: int, stage: int) -> range:
    """The layers of one pipeline stage: a run of consecutive layers, at least one, chosen so that the slowest
    stage is as fast as it can be. Work is counted as matmul weights per token: a layer's projections, and the head
    on the last stage (a 32000-word vocabulary costs as much as three or four layers of a small model)."""
    return pipeline_split(config.n_layers, pp, layer_weights(config), config.vocab_size * config.dim)[stage]


def layer_weights(config: LlamaConfig) -> int:
    q_dim = config.n_heads * config.head_dim
    return config.dim * (2 * q_dim + 2 * config.kv_dim) + 3 * config.dim * config.hidden_dim


@functools.cache
def pipeline_split(n_layers: int, pp: int, layer_cost: int, head_cost: int) -> list[range]:
    """n_layers layers of equal cost cut into pp runs of at least one, the last run also paying head_cost: the
    last stage's share is chosen to make the costliest stage as cheap as possible (then the stages as even as
    possible), the other stages share the rest evenly, earlier ones taking any extra layer."""
    if pp == 1:
        return [range(n_layers)]
    best = None
    for last in range(1, n_layers - pp + 2):
        base, extra = divmod(n_layers - last, pp - 1)
        sizes = [base + (s < extra) for s in range(pp - 1)] + [last]
        costs = [n * layer_cost for n in sizes[:-1]] + [last * layer_cost + head_cost]
        key = (max(costs), max(costs) - min(costs), last)
        if best is None or key < best[0]:
            best = (key, sizes)
    starts = np.cumsum([0] + best[1]).tolist()
    return [range(starts[s], starts[s + 1]) for s in range(pp)]


def layer_of(name: str) -> int | None:
    """The layer a weight belongs to (model.layers.3.mlp... -> 3), None for the embedding, final norm and head."""
    if not name.startswith("model.layers."):
        return None
    return int(name.split(".")[2])


def tp_axis(name: str) -> int | None:
    """The axis tensor parallelism splits this weight along, None if it is replicated."""
    if layer_of(name) is None:
        return None
    return TP_SPLIT.get(name.split(".", 3)[3])


def stage_of(name: str, config: LlamaConfig, pp: int) -> int:
    layer = layer_of(name)
    if layer is None:
        return 0 if name == "model.embed_tokens.weight" else pp - 1
    return next(s for s in range(pp) if layer in stage_layers(config, pp, s))


def parameter_names(config: LlamaConfig) -> list[str]:
    """The single-process model's parameters in order (what AdamW.state_dict's m.i and v.i count)."""
    return [name for name in weight_shapes(config) if not (name == "lm_head.weight" and config.tie_word_embeddings)]


def check_parallel(config: LlamaConfig, cfg: TrainConfig, mesh) -> None:
    """ValueError, the same on every rank, if the model or batch cannot be split over the mesh."""
    problems = []
    counts = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "hidden_dim": config.hidden_dim}
    uneven = [f"{what} = {count}" for what, count in counts.items() if count % mesh.tp]
    if uneven:
        problems.append(f"--tp {mesh.tp} does not divide {', '.join(uneven)} (tensor parallelism gives each rank an "
                        f"equal share of the attention heads, key/value heads and MLP units)")
    if config.n_layers < mesh.pp:
        problems.append(f"{config.n_layers} layers cannot fill --pp {mesh.pp} pipeline stages (each needs a layer)")
    if cfg.batch_size % mesh.dp:
        problems.append(f"batch size {cfg.batch_size} is not divisible by --dp {mesh.dp} (each data-parallel rank "
                        f"takes an equal share of every micro-batch)")
    if problems:
        raise ValueError("cannot split the model over the mesh: " + "; ".join(problems))


def shard_weights(config: LlamaConfig, weights: dict, mesh) -> dict[str, np.ndarray]:
    """The part of a whole model's weights that this rank holds: its stage's layers, sliced for its tensor rank.
    A tied head with pipeline stages is a copy of the embedding on the last stage (ParallelTrainer keeps the
    two equal by summing their gradients)."""
    shard = {}
    for name, array in weights.items():
        if stage_of(name, config, mesh.pp) != mesh.pp_rank:
            continue
        axis = tp_axis(name)
        if axis is not None:
            array = np.split(array, mesh.tp, axis=axis)[mesh.tp_rank]
        shard[name] = array
    return shard


@dataclasses.dataclass
class Chunk:
    """A run of one stage's layers whose gradients are all-reduced as one bucket. first: it starts with the
    embedding; last: it ends with the norm, head and loss. params: (name, tensor) of the weights it trains."""

    layers: range
    first: bool
    last: bool
    params: list


def plan_chunks(model: Llama, bucket_bytes: float) -> list[Chunk]:
    """Split the stage into chunks of about bucket_bytes of parameters (one chunk when there is no data
    parallelism, since there is nothing to overlap). Backward runs chunk by chunk, last first; once a chunk's
    gradients are complete their bucket's all-reduce starts while earlier chunks compute."""
    mesh = model.mesh
    first, last = mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1
    params = model.state_dict()
    groups, size = [[]], 0
    for i in model.layers:
        if groups[-1] and size >= bucket_bytes and mesh.dp > 1:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += sum(t.numel() * 4 for name, t in params.items() if layer_of(name) == i)
    chunks = []
    for k, layers in enumerate(groups):
        is_first, is_last = first and k == 0, last and k == len(groups) - 1
        names = [name for name in params if layer_of(name) in layers
                 or (is_first and name == "model.embed_tokens.weight")
                 or (is_last and name in ("model.norm.weight", "lm_head.weight"))]
        chunks.append(Chunk(range(layers[0], layers[-1] + 1), is_first, is_last, [(n, params[n]) for n in names]))
    return chunks


class Pipe:
    """Activations forward and their gradients backward between neighbouring pipeline stages. The combined
    calls (send_forward_recv_backward, send_backward_recv_forward) post a send and a receive together, which is
    what keeps two stages that both have something to send from waiting on each other forever."""

    def __init__(self, mesh, token: pg.Tensor):
        self.group, self.stage = mesh.pp_group, mesh.pp_rank
        self.first, self.last = mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1
        self.token = token

    def _exchange(self, send, to, shape, source):
        out = self.group.exchange(send, to, shape, source, token=self.token).realize()
        return out if shape is not None else None

    def recv_forward(self, shape, grad=True):
        """The previous stage's output, as a leaf of this stage's graph (None on the first stage)."""
        if self.first:
            return None
        x = self._exchange(None, None, shape, self.stage - 1)
        return x.requires_grad_() if grad else x

    def send_forward(self, y):
        if not self.last:
            self._exchange(y, self.stage + 1, None, None)

    def send_forward_recv_backward(self, y):
        """Send an output, receive the gradient of an earlier one (None on the last stage, whose output is a loss)."""
        if self.last:
            return None
        return self._exchange(y, self.stage + 1, y.shape, self.stage + 1)

    def recv_backward(self, shape):
        return None if self.last else self._exchange(None, None, shape, self.stage + 1)

    def send_backward(self, g):
        if not self.first:
            self._exchange(g, self.stage - 1, None, None)

    def send_backward_recv_forward(self, g, shape):
        if self.first:
            return None
        return self._exchange(g, self.stage - 1, shape, self.stage - 1).requires_grad_()


class ParallelTrainer(Trainer):
    """Trainer for one rank of a mesh: the same loop, data and checkpoints as Trainer, with a step that runs this
    rank's pipeline stage under a 1F1B schedule, all-reduces gradients over data-parallel replicas and clips by
    the global norm over the whole model."""

    def __init__(self, model: Llama, cfg: TrainConfig, corpus: Corpus, out: str, mesh, log=print, bucket_mb=25.0):
        self.mesh = mesh
        super().__init__(model, cfg, corpus, out, log)
        self.first, self.last = mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1
        self.chunks = plan_chunks(model, bucket_mb * 2**20)
        # a realized scalar on this rank's device: what an exchange that only receives takes as its input
        self.token = pg.zeros(1, device=model.device).contiguous().realize()
        self.pipe = Pipe(mesh, self.token)
        self.buckets = []   # (params, flat gradients, started all-reduce) of the step in progress
        # with pipeline stages, a tied head is a copy of the embedding on the last stage: the two copies' gradients
        # are summed over the first and last stage, so both take the same update
        w = model.weights
        self.tied = None
        if model.config.tie_word_embeddings and mesh.pp > 1:
            self.tied = w["model.embed_tokens.weight"] if self.first else w["lm_head.weight"] if self.last else None
        # the gradient norm counts every weight of the model once: tensor-parallel slices on every rank,
        # replicated weights on tensor rank 0, and a tied head on the first stage only
        self.counted = [p for name, p in model.state_dict().items()
                        if (tp_axis(name) is not None or mesh.tp_rank == 0) and not (p is self.tied and not self.first)]
        if mesh.rank != 0:
            self.progress = open(os.devnull, "w")  # noqa: SIM115 (the progress bar's sink for the run's length)

    # -- one optimizer step on this rank
    def _train_step(self, tokens: pg.Tensor, targets: pg.Tensor) -> pg.Tensor:
        # tokens, targets: [accum, batch / dp, seq], this replica's rows of every micro-batch. 1F1B: stage s first
        # runs pp - s - 1 forwards (the warmup that fills the pipeline), then alternates one forward and one
        # backward, then drains the remaining backwards, so at most pp - s micro-batches hold activations
        mesh, pipe = self.mesh, self.pipe
        n = tokens.shape[0]
        shape = (tokens.shape[1], tokens.shape[2], self.model.config.dim)
        # the mean over all micro-batches and replicas (the data-parallel all-reduce sums)
        scale = 1.0 / (n * mesh.dp)
        warmup = min(mesh.pp - mesh.pp_rank - 1, n)
        live, losses = {}, []

        def forward(i, x):
            live[i] = self._forward(x, tokens[i], targets[i], scale)
            out = live[i][-1][1]
            if self.last:
                losses.append(out.detach())
            return out

        def backward(i, g):
            return self._backward(live.pop(i), g, final=i == n - 1)

        for i in range(warmup):
            pipe.send_forward(forward(i, pipe.recv_forward(shape)))
        x = pipe.recv_forward(shape) if warmup < n else None
        for k in range(n - warmup):
            g = pipe.send_forward_recv_backward(forward(warmup + k, x))
            gx = backward(k, g)
            if k == n - warmup - 1:
                pipe.send_backward(gx)
            else:
                x = pipe.send_backward_recv_forward(gx, shape)
        for k in range(n - warmup, n):
            pipe.send_backward(backward(k, pipe.recv_backward(shape)))
        self._finish_gradients()
        self.opt.step()
        self.opt.zero_grad()
        total = pg.Tensor.full((), 0.0, device=self.model.device)
        for loss in losses:
            total = total + loss
        return total

    def _forward(self, x, tokens, targets, scale) -> list:
        """This stage's forward pass of one micro-batch, chunk by chunk: [(chunk input leaf, chunk output)], the
        last output being the stage's output (or, on the last stage, the scaled loss)."""
        m = self.model
        cos, sin, attend = m.causal(tokens.shape[-1])
        pieces = []
        for k, chunk in enumerate(self.chunks):
            if k > 0:
                # the next chunk starts from a leaf, so its backward can run (and finish its bucket) on its own
                x = pieces[-1][1].detach().requires_grad_()
            h = m.embed(tokens) if chunk.first else x
            for i in chunk.layers:
                h = m.block(i, h, cos, sin, attend)
            if chunk.last:
                logits = m.head(h)
                h = pg.cross_entropy(logits.reshape(-1, m.config.vocab_size), targets.reshape(-1)) * scale
            pieces.append((None if chunk.first else x, h))
        return pieces

    def _backward(self, pieces, g, final):
        """Backward through the chunks of one micro-batch, last first, from the gradient g of the stage output
        (None on the last stage: the output is the loss). In the final micro-batch a chunk's gradients are
        complete once its backward ran: its bucket's all-reduce starts then. Returns the gradient of the stage
        input (None on the first stage)."""
        for k in reversed(range(len(pieces))):
            x, out = pieces[k]
            if g is None:
                out.backward()
            else:
                out.backward(g)
            if final and self.mesh.dp > 1:
                self._start_bucket(self.chunks[k])
            g = None if x is None else x.grad
        return g

    def _start_bucket(self, chunk):
        params = [p for _, p in chunk.params]
        with pg.no_grad():
            flat = pg.cat([p.grad.reshape(-1) for p in params])
            # realized here, so the collective is issued before the next chunk's backward: on a GPU it runs on
            # NCCL's side stream while those kernels run; MPI (the CPU) progresses it only inside MPI calls
            started = self.mesh.dp_group.all_reduce_start(flat).realize()
        self.buckets.append((params, flat, started))

    def _finish_gradients(self):
        """Wait for the buckets, sum a tied embedding over its two stages, and clip by the global norm. Blocking
        collectives are realized one at a time, so every rank meets them in the same order."""
        mesh = self.mesh
        with pg.no_grad():
            for params, flat, started in self.buckets:
                summed = mesh.dp_group.all_reduce_finish(started, flat).realize()
                offset = 0
                for p in params:
                    p.grad = summed[offset:offset + p.numel()].reshape(p.shape)
                    offset += p.numel()
            self.buckets = []
            if self.tied is not None:
                self.tied.grad = mesh.ends_group.all_reduce(self.tied.grad).realize()
            # pg.clip_grad_norm_, with the sum of squares completed over the ranks that hold the model's pieces
            total = pg.Tensor.full((), 0.0, device=self.model.device)
            for p in self.counted:
                total = total + (p.grad * p.grad).sum()
            norm = mesh.model_group.all_reduce(total).realize().sqrt()
            scale = (self.cfg.grad_clip / (norm + 1e-6)).minimum(1.0)
            for p in self.opt.params:
                p.grad = p.grad * scale

    def _eval_step(self, tokens: pg.Tensor, targets: pg.Tensor) -> pg.Tensor:
        m = self.model
        with pg.no_grad():
            x = self.pipe.recv_forward((tokens.shape[0], tokens.shape[1], m.config.dim), grad=False)
            cos, sin, attend = m.causal(tokens.shape[1])
            h = m.embed(tokens) if self.first else x
            for i in m.layers:
                h = m.block(i, h, cos, sin, attend)
            if self.last:
                return pg.cross_entropy(m.head(h).reshape(-1, m.config.vocab_size), targets.reshape(-1))
            self.pipe.send_forward(h)
            return pg.Tensor.full((), 0.0, device=m.device)

    # -- the loop's hooks: this replica's rows of each batch, and numbers every rank agrees on
    def _rows(self, array: np.ndarray) -> np.ndarray:
        rows = array.shape[-2] // self.mesh.dp
        return np.ascontiguousarray(array[..., self.mesh.dp_rank * rows:(self.mesh.dp_rank + 1) * rows, :])

    def _loss(self, local: float, scale: float) -> float:
        """The loss every rank reports: the last stage's, summed over data replicas (tensor rank 0 only, since the
        other tensor ranks hold the same number)."""
        counts = self.last and self.mesh.tp_rank == 0
        return self.mesh.world.allreduce_number(local * scale if counts else 0.0)

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        device = self.model.device
        local = self.train_step(pg.Tensor(self._rows(x), device=device), pg.Tensor(self._rows(y), device=device))
        return self._loss(local.item(), 1.0)

    def evaluate(self) -> float:
        device = self.model.device
        losses = []
        for x, y in self.val_batches:
            local = self.eval_step(pg.Tensor(self._rows(x), device=device), pg.Tensor(self._rows(y), device=device))
            losses.append(self._loss(local.item(), 1.0 / self.mesh.dp))
        return float(np.mean(losses))

    def stopping(self) -> bool:
        return self.agree(float(self.stop_requested), "max") > 0

    def agree(self, value: float, op: str) -> float:
        return self.mesh.world.allreduce_number(value, op)

    # -- checkpoints: gathered to rank 0, which writes the same folder a single process would
    def save(self) -> bool:
        weights, optimizer_state = gather_checkpoint(self.model, self.opt, self.mesh)
        ok = True
        if self.mesh.rank == 0:
            ok = write_checkpoint(self.out, self.model.config, weights, self.tokenizer, optimizer_state, self.state())
        return self.agree(float(ok), "min") > 0

    def read_optimizer(self, folder: str) -> dict:
        """This rank's slice of a saved optimizer state (saved by any mesh, or by one process)."""
        saved = pg.read_safetensors(os.path.join(folder, "optimizer.safetensors"))
        config, device = self.model.config, self.model.device
        names = parameter_names(config)
        state = {key: pg.Tensor(np.asarray(saved[key], np.float32).reshape(()), device=device)
                 for key in ("lr", "b1_t", "b2_t")}
        for j, (name, _) in enumerate(self.model.state_dict().items()):
            # the last stage's copy of a tied head shares the embedding's moments
            k = names.index("model.embed_tokens.weight" if name not in names else name)
            for moment in ("m", "v"):
                array = saved[f"{moment}.{k}"]
                axis = tp_axis(name)
                if axis is not None:
                    array = np.split(array, self.mesh.tp, axis=axis)[self.mesh.tp_rank]
                state[f"{moment}.{j}"] = pg.Tensor(np.ascontiguousarray(array, np.float32), device=device)
        return state


def gather_checkpoint(model: Llama, opt, mesh) -> tuple[dict | None, dict | None]:
    """Every weight and its AdamW moments, whole, as numpy arrays on rank 0 (None elsewhere), named as a single
    process names them. The holders of each weight (data rank 0 of its stage; every tensor rank if it is split)
    send their slices to rank 0 in a fixed order, which rank 0 receives and joins."""
    config = model.config
    local = model.state_dict()
    index = {id(p): j for j, p in enumerate(opt.params)}
    shapes = weight_shapes(config)
    weights, moments = {}, {}
    for k, name in enumerate(parameter_names(config)):
        axis = tp_axis(name)
        stage = stage_of(name, config, mesh.pp)
        holders = [mesh.rank_of(stage, 0, t) for t in (range(mesh.tp) if axis is not None else [0])]
        mine = None
        if mesh.rank in holders:
            j = index[id(local[name])]
            mine = [local[name].numpy(), opt.m[j].numpy(), opt.v[j].numpy()]
            if mesh.rank != 0:
                for part, array in enumerate(mine):
                    mesh.world.send_array(array, 0, tag=3 * k + part)
        if mesh.rank != 0:
            continue
        shape = list(shapes[name])
        if axis is not None:
            shape[axis] //= mesh.tp
        pieces = [mine if rank == 0 else [mesh.world.recv_array(shape, np.float32, rank, tag=3 * k + part)
                                          for part in range(3)] for rank in holders]
        whole = [np.concatenate(parts, axis=axis) if axis is not None else parts[0] for parts in zip(*pieces)]
        weights[name], moments[f"m.{k}"], moments[f"v.{k}"] = whole
    if mesh.rank != 0:
        return None, None
    state = {"lr": np.array(opt.lr, np.float32), "b1_t": opt.b1_t.numpy(), "b2_t": opt.b2_t.numpy(), **moments}
    return weights, state


# ----------------------------------------------------------------------------------------------------------------
# CLI


def check_tokenizer(tokenizer: Tokenizer, config: LlamaConfig, path: str):
    """Refuse a tokenizer made for another model: its ids would index the wrong embeddings, silently."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                         f"{config.vocab_size}: they do not belong together (pass the model's own with --tokenizer)")


def _default_tokenizer(checkpoint: str) -> str:
    if os.path.isdir(checkpoint):
        return checkpoint
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "tokenizer.bin")


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def sample_text(model: Llama, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_p: float, seed: int | None) -> list[int]:
    """Stream the prompt and its continuation to stdout as the tokens arrive; returns the new ids."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    stream = tokenizer.stream()
    _write("".join(stream(i) for i in prompt_ids))
    ids = model.generate(prompt_ids, max_new_tokens, temperature, top_p, seed,
                         stop_ids=tokenizer.stop_ids | model.config.stop_ids,
                         on_token=lambda i: _write(stream(i)))
    _write(stream.flush() + "\n")
    return ids


def cmd_generate(args) -> int:
    model = Llama.from_pretrained(args.checkpoint, device=args.device, max_seq_len=args.max_seq_len)
    tokenizer_path = args.tokenizer or _default_tokenizer(args.checkpoint)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    check_tokenizer(tokenizer, model.config, tokenizer_path)
    sample_text(model, tokenizer, args.prompt, args.steps, args.temperature, args.top_p, args.seed)
    print(format_timings(model.timings), file=sys.stderr)
    return 0


# `python llama.py` trains for this long (plus start-up and the sample): under five minutes on two cores, and
# as many steps as the machine manages in that time
DEFAULT_TIME_BUDGET = 200.0
MAX_BUDGETED_STEPS = 10000


def cmd_train(args) -> int:
    time_budget = args.time_budget
    steps = args.steps
    if steps is None and time_budget is None:
        time_budget = DEFAULT_TIME_BUDGET
    if steps is None:
        steps = MAX_BUDGETED_STEPS
    cfg = TrainConfig(steps=steps, time_budget=time_budget, batch_size=args.batch_size, seq_len=args.seq_len,
                      accum=args.accum, lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                      seed=args.seed, data=None if args.data is None else os.path.abspath(args.data))
    model_config = None
    if args.resume is None:
        hidden = args.hidden_dim or 32 * math.ceil(8 * args.dim / 3 / 32)   # SwiGLU's 8/3 d, rounded as Llama
        model_config = LlamaConfig(dim=args.dim, hidden_dim=hidden, n_layers=args.n_layers, n_heads=args.n_heads,
                                   n_kv_heads=args.n_kv_heads or args.n_heads, vocab_size=257,
                                   max_seq_len=args.seq_len, tie_word_embeddings=True,
                                   bos_token_id=ByteTokenizer.BOS, eos_token_id=ByteTokenizer.BOS)
    out = args.out or args.resume or "runs/llama"
    start = time.perf_counter()
    mesh, device = None, args.device
    if dist.launched_size() > 1 or max(args.pp, args.tp, args.dp or 1) > 1:
        # one process per device: the mesh, then this rank's device and its NCCL communicators
        dp = args.dp or max(1, dist.launched_size() // (args.pp * args.tp))
        mesh = dist.init(pp=args.pp, dp=dp, tp=args.tp)
        device = mesh.local_device(args.device or os.environ.get("DEVICE", "CPU"))
        mesh.connect(device)
    trainer = train(cfg, model_config, out=out, device=device, resume=args.resume, steps=args.steps, mesh=mesh,
                    bucket_mb=args.bucket_mb)
    if trainer.outcome == "diverged":
        return 1
    if trainer.outcome == "interrupted":
        return 130
    if mesh is not None and mesh.rank != 0:
        return 0
    history = trainer.history
    tail = [loss for _, loss in history["train"][-20:]]
    val = history["val"][-1][1] if history["val"] else float("nan")
    print(f"done in {time.perf_counter() - start:.0f} s: train loss {np.mean(tail):.4f} (mean of the last "
          f"{len(tail)} steps), validation loss {val:.4f}, unigram baseline {trainer.unigram:.4f} nats/token")
    print(plot_losses(history, os.path.join(out, "loss.png"), trainer.unigram))
    print(f"checkpoint: {out} (try `python llama.py generate --checkpoint {out} --prompt 'def '`)")
    if args.sample_tokens > 0:
        print("sample:")
        # a parallel run samples from its checkpoint, loaded whole into this one process
        model = trainer.model if mesh is None else Llama.from_pretrained(out, device=device)
        sample_text(model, trainer.tokenizer, args.prompt, args.sample_tokens, 0.8, 0.95, args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama.py", description="Llama on picograd: `train` a small byte-level "
                                     "model from scratch (the default when no command is given) or `generate` "
                                     "text from a checkpoint.")
    commands = parser.add_subparsers(dest="command")
    gen = commands.add_parser("generate", help="generate text from a llama2.c .bin file or a Hugging Face folder")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--tokenizer", default=None, help="tokenizer file (default: next to the checkpoint)")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--steps", type=int, default=256, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling; 1 disables it")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="CPU or CUDA (default: $DEVICE or CPU)")
    gen.add_argument("--max-seq-len", type=int, default=4096, help="context window (caps the KV cache)")
    tr = commands.add_parser("train", help="train a byte-level Llama from scratch (or --resume one)")
    tr.add_argument("--data", default=None, help="UTF-8 text file (default: this Python's standard library)")
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as many as fit in "
                    f"--time-budget, which defaults to {DEFAULT_TIME_BUDGET:.0f} s)")
    tr.add_argument("--time-budget", type=float, default=None, help="seconds of training; with --steps, the "
                    "steps are a cap")
    tr.add_argument("--out", default=None, help="checkpoint folder (default: runs/llama, or the --resume folder)")
    tr.add_argument("--device", default=None, help="CPU or CUDA (default: $DEVICE or CPU)")
    tr.add_argument("--resume", default=None, help="checkpoint folder to continue, with its optimizer state")
    tr.add_argument("--dim", type=int, default=64)
    tr.add_argument("--n-layers", type=int, default=2)
    tr.add_argument("--n-heads", type=int, default=4)
    tr.add_argument("--n-kv-heads", type=int, default=2)
    tr.add_argument("--hidden-dim", type=int, default=None, help="default: 8/3 dim, rounded up to 32")
    tr.add_argument("--seq-len", type=int, default=TrainConfig.seq_len, help="training context, and the model's")
    tr.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    tr.add_argument("--accum", type=int, default=TrainConfig.accum, help="micro-batches per step (gradient "
                    "accumulation)")
    tr.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (the cosine ends at a "
                    "tenth)")
    tr.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    tr.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    tr.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    tr.add_argument("--eval-every", type=int, default=TrainConfig.eval_every, help="validation loss and a "
                    "checkpoint this often (default: five times a run)")
    tr.add_argument("--seed", type=int, default=TrainConfig.seed)
    tr.add_argument("--prompt", default="def ", help="start of the sample written after training")
    tr.add_argument("--sample-tokens", type=int, default=200)
    tr.add_argument("--pp", type=int, default=1, help="pipeline stages (under mpiexec; pp * dp * tp processes)")
    tr.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: processes / (pp * tp))")
    tr.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (split attention heads and MLP units)")
    tr.add_argument("--bucket-mb", type=float, default=25.0, help="data-parallel gradient bucket size in MiB")
    return parser


def main(argv: list[str] | None = None) -> int:
    """python llama.py [train|generate] ...; with no command, train the default model and sample from it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("train", "generate", "-h", "--help"):
        argv = ["train"] + argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_train(args)
    except (ValueError, OSError) as e:
        # bad input (a corrupt checkpoint, a mismatched tokenizer, an unreadable file): the message is the
        # answer, a traceback would only bury it
        if dist.launched_size() == 1:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # under mpiexec every rank usually meets the same error: each says it, and they wait briefly for one
        # another, so that no rank's exit makes mpiexec kill the others before they have said it too
        sys.stderr.write(f"[rank {dist.launched_rank()}] error: {e}\n")   # one write: ranks share the terminal
        sys.stderr.flush()
        dist.settle()
        return 2
    except KeyboardInterrupt:
        # a second Ctrl-C during training, or one during generation
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

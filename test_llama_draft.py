"""Tests of llama.py: config, RoPE tables, loaders, tokenizers, sampling, the model and generation (issue 4),
training and checkpoints (issue 5), and the CLI.

Checked against independent implementations: sentencepiece, Hugging Face tokenizers and transformers (logits,
greedy continuations, a training step against torch.optim.AdamW), the safetensors package, llama2.c's forward
pass transcribed to numpy, and llama2.c's published sample text.
"""

import json
import os
import shutil
import signal
import struct
import sys

import numpy as np
import pytest

import llama
import picograd as pg

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "models")


def model_path(name):
    path = os.path.join(MODELS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present")
    return path


TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "hello world",
    "héllo wörld, ça va? Ñandú, Ærø, İstanbul",
    "日本語のテキスト 世界 中文",
    "emoji 🙂🎉 and a flag 🇫🇷 and a family 👨‍👩‍👧",
    "line one\nline two\n\nline four\r\nwindows\n",
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "numbers 1234567 3.14159 1,000,000",
    "It's we're they've I'm you'll he'd IT'S 'quoted'",
    "punctuation!!! ... ?! (parens) [brackets] {braces} <angle> #hash @at $100 50%",
    "MiXeD CaSe WORDS",
    "x",
    " ",
    "e\u0301 combining accent, and a ZWJ\u200dchar",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

# plain sentences: tok512.model was trained with sentencepiece's remove_extra_whitespaces, which collapses runs of
# spaces, while llama2.c's encoder (which has no normalizer settings to read) keeps them
PLAIN_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her dog, Max!",
    "héllo wörld, ça va?",
    "日本語のテキスト 世界",
    "emoji 🙂🎉 ok",
    "line one\nline two\n\nline four",
    "numbers 1234567 3.14159",
    "It's a 'quote' and a dash — plus… «guillemets»",
    "x",
]


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_hf_round_trip():
    config = llama.LlamaConfig(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100,
                               max_seq_len=256, head_dim=16, norm_eps=1e-6, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                               tie_word_embeddings=False, bos_token_id=5, eos_token_id=[6, 7])
    hf = json.loads(json.dumps(config.to_hf()))
    assert llama.LlamaConfig.from_hf(hf) == config
    assert hf["model_type"] == "llama" and hf["hidden_size"] == 64 and hf["num_key_value_heads"] == 2


def test_config_from_hf_defaults_and_transformers5_rope():
    hf = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "vocab_size": 10,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    config = llama.LlamaConfig.from_hf(hf)
    assert config.head_dim == 8 and config.n_kv_heads == 4 and config.rope_theta == 500000.0
    assert config.rope_scaling["factor"] == 32.0 and config.rope_scaling["rope_type"] == "llama3"
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert llama.LlamaConfig.from_hf(hf).rope_scaling is None


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "mistral"),
    ({"model_type": None}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_attention_heads": None}, "num_attention_heads"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_config_from_hf_errors(change, message):
    hf = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "vocab_size": 10}
    for key, value in change.items():
        if value is None:
            del hf[key]
        else:
            hf[key] = value
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig.from_hf(hf)


# ----------------------------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("kwargs", [
    dict(dim=64, n_heads=8, max_seq_len=512, rope_theta=10000.0),
    dict(dim=256, n_heads=4, head_dim=128, max_seq_len=4096, rope_theta=500000.0,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 1024}),
    dict(dim=96, n_heads=3, head_dim=64, max_seq_len=2048, rope_theta=500000.0,
         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 512}),
])
def test_rope_tables_match_transformers(kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = llama.LlamaConfig(hidden_dim=32, n_layers=1, n_kv_heads=1, vocab_size=8, **kwargs)
    cos, sin = llama.rope_tables(config)
    half = config.head_dim // 2
    assert cos.shape == sin.shape == (config.max_seq_len, half) and cos.dtype == sin.dtype == np.float32
    # our config.json is what transformers builds its rotary embedding from
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**config.to_hf()))
    positions = torch.arange(config.max_seq_len)[None]
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    ref_cos = ref_cos[0].numpy()
    ref_sin = ref_sin[0].numpy()
    inv_freq = llama.rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_array_equal(inv_freq, rotary.inv_freq.numpy())
    # transformers repeats the table for the two halves; ours holds one half
    np.testing.assert_allclose(cos, ref_cos[:, :half], atol=2e-6, rtol=0)
    np.testing.assert_allclose(sin, ref_sin[:, :half], atol=2e-6, rtol=0)
    np.testing.assert_array_equal(ref_cos[:, :half], ref_cos[:, half:])


# ----------------------------------------------------------------------------------------------------------------
# llama2.c checkpoints


def test_llama2c_loads_stories260k():
    config, weights = llama.load_llama2c(model_path("stories260K.bin"))
    assert (config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size,
            config.max_seq_len, config.head_dim) == (64, 172, 5, 8, 4, 512, 512, 8)
    assert config.tie_word_embeddings and config.norm_eps == 1e-5
    expected = llama.weight_shapes(config)
    assert list(weights) == list(expected)
    for name, shape in expected.items():
        assert weights[name].shape == shape and weights[name].dtype == np.float32, name
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert all(np.isfinite(w).all() for w in weights.values())


def test_llama2c_loads_aidreams260k():
    config, weights = llama.load_llama2c(model_path("aidreams260K.bin"))
    assert (config.n_layers, config.n_heads, config.head_dim, config.max_seq_len) == (4, 4, 16, 128)
    assert weights["model.layers.3.mlp.down_proj.weight"].shape == (64, 172)


@pytest.mark.parametrize("delta", [-4, -1000, 4])
def test_llama2c_wrong_size_raises(tmp_path, delta):
    source = model_path("stories260K.bin")
    size = os.path.getsize(source)
    bad = tmp_path / "bad.bin"
    with open(source, "rb") as f:
        data = f.read()
    bad.write_bytes(data[:size + delta] if delta < 0 else data + b"\0" * delta)
    with pytest.raises(ValueError) as info:
        llama.load_llama2c(str(bad))
    message = str(info.value)
    assert "bad.bin" in message and str(size) in message and str(size + delta) in message


def test_llama2c_separate_classifier(tmp_path):
    # a tiny checkpoint written the way llama2.c's export does, with a negative vocabulary size
    dim, hidden, layers, heads, kv_heads, vocab, seq = 8, 12, 2, 2, 1, 10, 4
    head = dim // heads
    rng = np.random.default_rng(0)
    shapes = [(vocab, dim), (layers, dim), (layers, dim, dim), (layers, kv_heads * head, dim),
              (layers, kv_heads * head, dim), (layers, dim, dim), (layers, dim), (layers, hidden, dim),
              (layers, dim, hidden), (layers, hidden, dim), (dim,), (seq, head // 2), (seq, head // 2), (vocab, dim)]
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    path = tmp_path / "tiny.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab, seq))
        for array in arrays:
            f.write(array.tobytes())
    config, weights = llama.load_llama2c(str(path))
    assert not config.tie_word_embeddings
    np.testing.assert_array_equal(weights["lm_head.weight"], arrays[-1])
    np.testing.assert_array_equal(weights["model.layers.1.mlp.gate_proj.weight"], arrays[7][1])
    np.testing.assert_array_equal(weights["model.layers.1.mlp.down_proj.weight"], arrays[8][1])
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.v_proj.weight"], arrays[4][1])
    np.testing.assert_array_equal(weights["model.norm.weight"], arrays[10])


def rope_interleaved(x, positions, theta=10000.0):
    """llama2.c's RoPE: rotate adjacent pairs (2i, 2i+1) of each head by position * freq_i. x: [T, H, D]."""
    head_dim = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angle = positions[:, None, None] * freqs
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(angle) - x1 * np.sin(angle)
    out[..., 1::2] = x0 * np.sin(angle) + x1 * np.cos(angle)
    return out


def rope_half(x, cos, sin):
    """Hugging Face's RoPE: rotate (i, i + D/2) with rotate_half. x: [T, H, D], cos and sin: [T, D/2]."""
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    c = cos[:, None, :]
    s = sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def test_permute_rope_rows_turns_interleaved_into_rotate_half():
    rng = np.random.default_rng(1)
    n_heads, head_dim, dim, T = 3, 8, 12, 7
    w = rng.standard_normal((n_heads * head_dim, dim))
    x = rng.standard_normal((T, dim))
    positions = np.arange(T, dtype=np.float64) * 3
    original = rope_interleaved((x @ w.T).reshape(T, n_heads, head_dim), positions)
    config = llama.LlamaConfig(dim=dim, hidden_dim=4, n_layers=1, n_heads=n_heads, n_kv_heads=1, vocab_size=4,
                               max_seq_len=int(positions[-1]) + 1, head_dim=head_dim)
    cos, sin = llama.rope_tables(config)
    permuted = llama.permute_rope_rows(w, n_heads)
    rotated = rope_half((x @ permuted.T).reshape(T, n_heads, head_dim), cos[positions.astype(int)],
                        sin[positions.astype(int)])
    # the same rotation, with each head's dimensions reordered evens-then-odds
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    np.testing.assert_allclose(rotated, original[..., order], atol=1e-5)
    # so attention scores, a dot product within each head, are unchanged
    np.testing.assert_allclose(np.einsum("thd,shd->hts", rotated, rotated),
                               np.einsum("thd,shd->hts", original, original), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# safetensors and Hugging Face folders


def tiny_config(**changes):
    fields = dict(dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=32,
                  tie_word_embeddings=False)
    fields.update(changes)
    return llama.LlamaConfig(**fields)


def tiny_weights(config, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in llama.weight_shapes(config).items()}


def write_folder(folder, config, weights, shards=1):
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    names = list(weights)
    if shards == 1:
        save_file(weights, os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[s::shards]}
        save_file(part, os.path.join(folder, shard))
        weight_map.update({name: shard for name in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_round_trip(tmp_path, shards):
    pytest.importorskip("safetensors")
    config = tiny_config()
    weights = tiny_weights(config)
    write_folder(tmp_path / "model", config, weights, shards)
    loaded_config, loaded = llama.load_checkpoint(str(tmp_path / "model"))
    assert loaded_config == config
    assert list(loaded) == list(weights)
    for name in weights:
        np.testing.assert_array_equal(loaded[name], weights[name])
        assert loaded[name].dtype == np.float32


def test_hf_tied_embeddings_and_half_precision(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    config = tiny_config(tie_word_embeddings=True)
    weights = tiny_weights(config)
    del weights["lm_head.weight"]
    tensors = {}
    for i, (name, array) in enumerate(weights.items()):
        dtype = [torch.float32, torch.float16, torch.bfloat16][i % 3]
        tensors[name] = torch.from_numpy(array).to(dtype)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(tensors, str(folder / "model.safetensors"))
    _, loaded = llama.load_hf(str(folder))
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor.float().numpy())
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]


def test_hf_missing_tensor_and_wrong_shape(tmp_path):
    pytest.importorskip("safetensors")
    config = tiny_config()
    weights = tiny_weights(config)
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_folder(tmp_path / "missing", config, weights)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(24, 16\)"):
        llama.load_hf(str(tmp_path / "missing"))
    weights = tiny_weights(config)
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    write_folder(tmp_path / "shape", config, weights)
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(16, 16\), expected \(8, 16\)"):
        llama.load_hf(str(tmp_path / "shape"))


def test_hf_index_cannot_point_outside_the_folder(tmp_path):
    pytest.importorskip("safetensors")
    config = tiny_config()
    write_folder(tmp_path / "model", config, tiny_weights(config), shards=2)
    index_path = tmp_path / "model" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="elsewhere"):
        llama.load_hf(str(tmp_path / "model"))


def write_raw_safetensors(path, header, data, header_len=None):
    header_bytes = json.dumps(header).encode() if isinstance(header, dict) else header
    length = len(header_bytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)


def test_safetensors_reader_matches_package(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.float32([[1.5]]),
               "empty": np.zeros((0, 4), np.float32), "half": np.float16([1, -2, 65504])}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    loaded = llama._read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array.astype(np.float32))


def f32(name, shape, begin, end):
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}}


@pytest.mark.parametrize("header, data, header_len, message", [
    ({}, b"", 1000, "does not fit"),                                    # header length past the end of the file
    ({}, b"", 2 ** 64 - 1, "does not fit"),                             # huge (negative as a signed int64)
    ({}, b"", 2 ** 63, "does not fit"),
    (f32("a", [4], 0, 16), b"\0" * 8, None, "outside"),                 # data past the end of the file
    (f32("a", [1], -4, 0), b"\0" * 4, None, "outside"),                 # negative offset
    (f32("a", [1], 8, 4), b"\0" * 8, None, "outside"),                  # end before begin
    ({**f32("a", [2], 0, 8), **f32("b", [2], 4, 12)}, b"\0" * 12, None, "overlaps"),
    (f32("a", [3], 0, 8), b"\0" * 8, None, "needs 12 bytes"),           # size does not match the shape
    (f32("a", [-2], 0, 8), b"\0" * 8, None, "invalid shape"),
    (f32("a", [1], 4, 8), b"\0" * 8, None, "belong to no tensor"),      # a hole
    ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "I64"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
])
def test_safetensors_reader_rejects_bad_files(tmp_path, header, data, header_len, message):
    path = tmp_path / "bad.safetensors"
    write_raw_safetensors(path, header, data, header_len)
    with pytest.raises(ValueError, match=message):
        llama._read_safetensors(str(path))


def test_safetensors_reader_rejects_tiny_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\1\0\0")
    with pytest.raises(ValueError, match="too short"):
        llama._read_safetensors(str(path))


# ----------------------------------------------------------------------------------------------------------------
# tokenizers


def check_round_trip_and_stream(tokenizer, texts):
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_id
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text, text
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text, text
        stream = tokenizer.stream()
        pieces = [stream(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        # text comes out only in whole characters: no replacement characters from split UTF-8 sequences
        assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("name", ["tok512.bin", "tokenizer.bin", "aidreams_tok512.bin"])
def test_llama2c_tokenizer_round_trip(name):
    tokenizer = llama.Tokenizer.from_file(model_path(name))
    assert isinstance(tokenizer, llama.Llama2cTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    check_round_trip_and_stream(tokenizer, TEXTS)
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("", bos=False) == []


@pytest.mark.parametrize("bin_name, model_name, texts", [
    ("tok512.bin", "tok512.model", PLAIN_TEXTS),
    ("tokenizer.bin", "tokenizer.model", TEXTS),
])
def test_llama2c_tokenizer_matches_sentencepiece(bin_name, model_name, texts):
    spm = pytest.importorskip("sentencepiece")
    tokenizer = llama.Tokenizer.from_file(model_path(bin_name))
    sp = spm.SentencePieceProcessor(model_file=model_path(model_name))
    assert tokenizer.vocab_size == sp.vocab_size()
    for text in texts:
        assert tokenizer.encode(text, bos=False) == sp.encode(text), text
        assert tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_sentencepiece_model_tokenizer():
    pytest.importorskip("sentencepiece")
    tokenizer = llama.Tokenizer.from_file(model_path("tokenizer.model"))
    reference = llama.Tokenizer.from_file(model_path("tokenizer.bin"))
    assert tokenizer.vocab_size == 32000 and tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    check_round_trip_and_stream(tokenizer, TEXTS)
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text)


def test_stream_decoder_holds_back_partial_utf8():
    tokenizer = llama.Tokenizer.from_file(model_path("tok512.bin"))
    ids = tokenizer.encode("a🙂")
    # tok512 has no emoji: it falls back to four byte tokens, and the character appears with the last one
    stream = tokenizer.stream()
    outputs = [stream(i) for i in ids]
    assert outputs[-4:] == ["", "", "", "🙂"]
    assert "".join(outputs) == "a🙂" and stream.flush() == ""
    stream = tokenizer.stream()
    assert "".join(stream(i) for i in ids[:-1]) == "a"
    assert stream.flush() == "\ufffd"


def sentencepiece_vocab():
    """Pieces, scores and ids of tokenizer.model, read through the sentencepiece package."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=model_path("tokenizer.model"))
    return sp, {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


@pytest.fixture(scope="module")
def llama2_style_json(tmp_path_factory):
    """Llama 2's tokenizer.json, built as transformers' LlamaConverter builds it from tokenizer.model."""
    tokenizers = pytest.importorskip("tokenizers")
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    sp, vocab = sentencepiece_vocab()
    merges = generate_merges(vocab)
    paths = {}
    for variant in ("legacy", "metaspace"):
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                                         byte_fallback=True))
        if variant == "legacy":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                                for t in ("<unk>", "<s>", "</s>")])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        path = tmp_path_factory.mktemp(variant) / "tokenizer.json"
        tok.save(str(path))
        paths[variant] = str(path)
    return paths


def check_matches_tokenizers(path, texts):
    tokenizers = pytest.importorskip("tokenizers")
    theirs = tokenizers.Tokenizer.from_file(path)
    ours = llama.Tokenizer.from_file(path)
    assert isinstance(ours, llama.HFTokenizer)
    assert ours.vocab_size == theirs.get_vocab_size(with_added_tokens=True)
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, bos=False) == expected, text
        assert ours.encode(text) == theirs.encode(text).ids, text
        assert ours.decode(expected) == theirs.decode(expected), text
    return ours


@pytest.mark.parametrize("variant", ["legacy", "metaspace"])
def test_llama2_style_tokenizer_json_matches_tokenizers(llama2_style_json, variant):
    special = ["<s>hello</s> world", "a <s> b", "<unk>"]
    ours = check_matches_tokenizers(llama2_style_json[variant], TEXTS + special)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    # Metaspace prepends "▁" only to text not already starting with one, yet decoding strips one: text with
    # leading spaces loses a space in tokenizers too
    check_round_trip_and_stream(ours, [t for t in TEXTS if variant == "legacy" or not t.startswith(" ")])
    # and, being built from the same vocabulary, it agrees with the llama2.c tokenizer on ordinary text
    reference = llama.Tokenizer.from_file(model_path("tokenizer.bin"))
    for text in PLAIN_TEXTS:
        assert ours.encode(text) == reference.encode(text), text


TRAINING_TEXT = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "It's a sunny day; they're happy, we've won, I'm sure you'll see what he'd done.",
    "Numbers: 1 22 333 4444 55555 3.14159 2024-01-01 $100.00 50%",
    "Café, naïve, résumé, Ærø, Straße, İstanbul, ÑANDÚ.",
    "日本語のテキストと中文的文本, 한국어 텍스트.",
    "Emoji 🙂🎉👍 and symbols ©®™ ∑∫√ → ←.",
    "def f(x):\n    return x * 2\n\n\nclass A:\n\tpass\r\n",
    "   indented    spaces   and\ttabs\t\tend   ",
]

LLAMA3_TEST_TEXTS = TEXTS + [
    "<|begin_of_text|>Hello<|eot_id|><|end_of_text|>",
    "I'M HERE, WE'LL GO, YOU'D SEE, 'S 'T 'Re 'Ve",
    "x\u017f 'ſ long s",
    "12345678901 a1b2c3 ١٢٣٤ ½ Ⅻ",
    "\n\n\n  \n \t\n x  \r\n\r\n y \n",
    "   ",
    "a\u00a0b\u3000c\u2028d\x1ce",
    "!!!\n\n??? \n...",
    "ab'cd 'x 'll",
]


def train_byte_level(pre_tokenizer, ignore_merges, tmp_path, name):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    path = tmp_path / name
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_llama3_style_tokenizer_json_matches_tokenizers(tmp_path, ignore_merges):
    pytest.importorskip("tokenizers")
    from tokenizers import Regex, pre_tokenizers
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama.LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    path = train_byte_level(pre_tokenizer, ignore_merges, tmp_path, "llama3.json")
    with open(path) as f:
        spec = json.load(f)
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == llama.LLAMA3_SPLIT_PATTERN
    ours = check_matches_tokenizers(path, LLAMA3_TEST_TEXTS + TRAINING_TEXT)
    assert (ours.bos_id, ours.eos_id) == (0, 1)
    assert ours.encode("<|eot_id|>", bos=False) == [2]
    check_round_trip_and_stream(ours, TEXTS)


@pytest.mark.parametrize("add_prefix_space", [True, False])
def test_gpt2_style_tokenizer_json_matches_tokenizers(tmp_path, add_prefix_space):
    pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    path = train_byte_level(pre_tokenizer, False, tmp_path, "gpt2.json")
    check_matches_tokenizers(path, LLAMA3_TEST_TEXTS + TRAINING_TEXT)


def test_split_scanners_match_regex_package():
    regex = pytest.importorskip("regex")
    # characters whose classes both Unicode versions agree on, chosen to hit every alternative
    pool = list("aZé日ſ'sStTrRvVmlLd019١½Ⅻ .,!?-_\"'\t\n\r\x0b\x0c\xa0\u3000\u2028\u0301🙂$")
    pool += [" ", " ", "'", "\n"]
    rng = np.random.default_rng(0)
    texts = LLAMA3_TEST_TEXTS + TRAINING_TEXT
    texts += ["".join(rng.choice(pool, size=rng.integers(1, 30))) for _ in range(2000)]
    llama3 = regex.compile(llama.LLAMA3_SPLIT_PATTERN)
    gpt2 = regex.compile(llama.GPT2_SPLIT_PATTERN)
    for text in texts:
        assert llama.split_llama3(text) == llama3.findall(text), repr(text)
        assert llama.split_gpt2(text) == gpt2.findall(text), repr(text)


def test_byte_level_tokenizer(tmp_path):
    tokenizer = llama.Tokenizer.byte_level()
    assert tokenizer.vocab_size == 257 and tokenizer.bos_id == 256
    assert tokenizer.encode("hé") == [256, 104, 195, 169]
    check_round_trip_and_stream(tokenizer, TEXTS)
    path = str(tmp_path / "tokenizer.json")
    tokenizer.save_hf(path)
    ours = check_matches_tokenizers(path, TEXTS)
    assert ours.bos_id == 256
    for text in TEXTS:
        assert ours.encode(text) == tokenizer.encode(text)


def test_unsupported_tokenizer_json_component_fails_at_load(tmp_path):
    spec = llama.Tokenizer.byte_level().to_hf()
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="Split"):
        llama.Tokenizer.from_file(str(path))


def test_tokenizer_from_folder(tmp_path):
    shutil.copy(model_path("tok512.bin"), tmp_path / "tokenizer.bin")
    assert isinstance(llama.Tokenizer.from_file(str(tmp_path)), llama.Llama2cTokenizer)
    llama.Tokenizer.byte_level().save_hf(str(tmp_path / "tokenizer.json"))
    assert isinstance(llama.Tokenizer.from_file(str(tmp_path)), llama.HFTokenizer)


# ----------------------------------------------------------------------------------------------------------------
# sampling and generation


def llama2c_sample_topp(probs, topp, coin):
    """run.c's sample_topp, transcribed loop for loop."""
    n = len(probs)
    cutoff = (1.0 - topp) / (n - 1)
    candidates = [(i, p) for i, p in enumerate(probs) if p >= cutoff]
    if not candidates:  # where run.c would read out of bounds, keep every token
        candidates = list(enumerate(probs))
    candidates.sort(key=lambda item: -item[1])
    cumulative = 0.0
    last = len(candidates) - 1
    for i, (_, p) in enumerate(candidates):
        cumulative += p
        if cumulative > topp:
            last = i
            break
    r = coin * cumulative
    cdf = 0.0
    for i in range(last + 1):
        cdf += candidates[i][1]
        if r < cdf:
            return candidates[i][0]
    return candidates[last][0]


def llama2c_sample_mult(probs, coin):
    cdf = 0.0
    for i, p in enumerate(probs):
        cdf += p
        if coin < cdf:
            return i
    return len(probs) - 1


def test_sampling_matches_llama2c():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 50))
        probs = llama.softmax(rng.standard_normal(n).astype(np.float32) * rng.uniform(0.1, 5))
        coin = float(rng.random())
        topp = float(rng.uniform(0.05, 0.99))
        assert llama.sample_topp(probs, topp, coin) == llama2c_sample_topp(probs, topp, coin)
        assert llama.sample_mult(probs, coin) == llama2c_sample_mult(probs, coin)
    assert llama.sample_argmax(np.float32([1, 3, 3, 2])) == 1


def test_sampler_is_seeded_and_honours_temperature():
    logits = np.float32([0.0, 1.0, 2.0, 0.5, -1.0])
    draws = [llama.Sampler(1.0, 0.9, seed=7)(logits) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    sampler = llama.Sampler(1.0, 1.0, seed=1)
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, llama.softmax(logits), atol=0.03)
    assert llama.Sampler(0.0, 0.9, seed=1)(logits) == 2
    # a tiny top-p keeps only the most likely token; a low temperature concentrates on it
    assert {llama.Sampler(1.0, 0.01, seed=s)(logits) for s in range(20)} == {2}
    assert {llama.Sampler(0.05, 1.0, seed=s)(logits) for s in range(20)} == {2}


def test_sentencepiece_missing_gives_clear_import_error(monkeypatch):
    path = model_path("tok512.model")
    # a None entry in sys.modules makes `import sentencepiece` fail as if the package were not installed
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        llama.Tokenizer.from_file(path)


# ----------------------------------------------------------------------------------------------------------------
# the model (issue 4): against llama2.c's own forward pass and against transformers


def llama2c_greedy(path, steps):
    """Greedy decoding from BOS with run.c's forward pass transcribed to numpy: it reads the checkpoint itself and
    rotates adjacent pairs (2i, 2i+1), so it shares nothing with llama.py (not the loader, not the permutation)."""
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), dtype=np.float32)
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        offset += n
        return data[offset - n:offset].reshape(shape)

    emb = take(vocab, dim)
    rms_att, wq, wk = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo, rms_ffn = take(n_layers, kv_dim, dim), take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len * head)  # the two legacy RoPE tables
    wcls = emb if shared else take(vocab, dim)

    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x) + np.float32(1e-5)))

    def rope(vec, pos):
        i = np.arange(0, len(vec), 2)
        angle = pos * (1.0 / 10000.0 ** ((i % head) / head)).astype(np.float32)
        v0, v1 = vec[0::2].copy(), vec[1::2].copy()
        vec[0::2] = v0 * np.cos(angle) - v1 * np.sin(angle)
        vec[1::2] = v0 * np.sin(angle) + v1 * np.cos(angle)

    key_cache = np.zeros((n_layers, seq_len, kv_dim), np.float32)
    value_cache = np.zeros((n_layers, seq_len, kv_dim), np.float32)
    token, out = 1, []
    for pos in range(steps):
        x = emb[token].copy()
        for layer in range(n_layers):
            xb = rmsnorm(x, rms_att[layer])
            q, k, v = wq[layer] @ xb, wk[layer] @ xb, wv[layer] @ xb
            rope(q, pos)
            rope(k, pos)
            key_cache[layer, pos], value_cache[layer, pos] = k, v
            heads = []
            for h in range(n_heads):
                kv = (h // (n_heads // n_kv_heads)) * head
                scores = key_cache[layer, :pos + 1, kv:kv + head] @ q[h * head:(h + 1) * head] / np.sqrt(head)
                scores = np.exp(scores - scores.max())
                heads.append((scores / scores.sum()) @ value_cache[layer, :pos + 1, kv:kv + head])
            x = x + wo[layer] @ np.concatenate(heads)
            xb = rmsnorm(x, rms_ffn[layer])
            gate = w1[layer] @ xb
            x = x + w2[layer] @ (gate / (1 + np.exp(-gate)) * (w3[layer] @ xb))
        token = int(np.argmax(wcls @ rmsnorm(x, rms_final)))
        out.append(token)
    return out


def test_stories260k_greedy_matches_llama2c():
    path = model_path("stories260K.bin")
    model = llama.Llama.from_pretrained(path)
    tokenizer = llama.Tokenizer.from_file(model_path("tok512.bin"))
    ids = model.generate([tokenizer.bos_id], 120, stop_ids=())
    assert len(ids) == 120
    # the sample text in ../shared/models/README.md, which is llama2.c's output
    expected = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert tokenizer.decode(ids).startswith(expected)
    assert ids == llama2c_greedy(path, 120)
    timings = model.timings
    assert timings["prefill_tokens"] == 1 and timings["decode_tokens"] + 1 >= 110


def transformers_model(tmp_path, **overrides):
    """A random transformers LlamaForCausalLM saved as a Hugging Face folder; returns (model, folder)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attn_implementation="eager")
    fields.update(overrides)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    with torch.no_grad():
        # bigger than the default init, so attention is far from uniform and errors would show
        for p in ref.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    folder = tmp_path / "hf"
    ref.save_pretrained(str(folder))
    return ref, str(folder)


HF_CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                     vocab_size=64, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3-rope-head_dim": dict(hidden_size=32, intermediate_size=80, num_attention_heads=4, num_key_value_heads=1,
                                 head_dim=16, vocab_size=80, max_position_embeddings=256, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_greedy_match_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    ref, folder = transformers_model(tmp_path, **HF_CONFIGS[name])
    model = llama.Llama.from_pretrained(folder)
    vocab = ref.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = ref(torch.from_numpy(tokens).long()).logits.numpy()
    got = model(pg.Tensor(tokens)).numpy()
    assert got.shape == (2, 24, vocab)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    # the same positions fed in two chunks through the cache
    first = model(pg.Tensor(tokens[:, :10])).numpy()
    rest = model(pg.Tensor(tokens[:, 10:]), start_pos=10).numpy()
    np.testing.assert_allclose(np.concatenate([first, rest], 1), got, rtol=0, atol=1e-4 * np.abs(want).max())
    prompt = [int(t) for t in tokens[0, :5]]
    with torch.no_grad():
        hf_ids = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert model.generate(prompt, 40, stop_ids=()) == hf_ids


def small_model(seed=0, **changes):
    fields = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64,
                  tie_word_embeddings=False)
    fields.update(changes)
    config = llama.LlamaConfig(**fields)
    weights = {name: w * 4 for name, w in llama.Llama.init_weights(config, seed).items()}
    return config, weights


def test_compiled_decode_agrees_with_graph_and_eager():
    config, weights = small_model()
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 40)).astype(np.int32)
    full = llama.Llama(config, weights)(pg.Tensor(tokens)).numpy()[0]
    scale = np.abs(full).max()
    for mode in ("graph", "eager"):
        with pg.eager(mode == "eager"):
            model = llama.Llama(config, weights)
            uncompiled = model(pg.Tensor(tokens)).numpy()[0]
            np.testing.assert_allclose(uncompiled, full, rtol=0, atol=1e-5 * scale)
            model(pg.Tensor(tokens[:, :28]))
            # positions 28..39 cross from ctx 32 to ctx 64: two traces
            for pos in range(28, 40):
                step = model.decode([int(tokens[0, pos])], pos).numpy()[0]
                np.testing.assert_allclose(step, full[pos], rtol=0, atol=1e-5 * scale, err_msg=f"{mode} {pos}")


def test_decode_does_not_recompile_per_position():
    model = llama.Llama.from_pretrained(model_path("stories260K.bin"))
    prompt = [1] + list(range(10, 79))   # 70 tokens: the 50 decode positions below all attend over ctx 128
    logits = model(pg.Tensor(np.array([prompt], np.int32)), last_only=True).numpy()
    token = int(np.argmax(logits))
    counts = []
    for pos in range(len(prompt), len(prompt) + 50):
        token = int(np.argmax(model.decode([token], pos).numpy()))
        counts.append((pg.stats()["kernels_compiled"], pg.stats()["traces"]))
    assert counts[1] == counts[-1]


def test_batched_decode_matches_single_sequences():
    config, weights = small_model(n_kv_heads=4, tie_word_embeddings=True)
    model = llama.Llama(config, weights)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (3, 6)).astype(np.int32)
    model(pg.Tensor(tokens[:, :5]))
    batched = model.decode(tokens[:, 5], 5).numpy()
    for b in range(3):
        single = llama.Llama(config, weights)(pg.Tensor(tokens[b:b + 1])).numpy()[0, -1]
        np.testing.assert_allclose(batched[b], single, rtol=0, atol=1e-4)


def test_generate_seeded_sampling_and_stops():
    config, weights = small_model()
    model = llama.Llama(config, weights)
    a = model.generate([1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=5, stop_ids=())
    b = model.generate([1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=5, stop_ids=())
    assert a == b and len(a) == 20
    assert model.generate([1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=6, stop_ids=()) != a
    # stopping at a token leaves it out; the context window ends generation too
    greedy = model.generate([1, 2, 3], 20, stop_ids=())
    assert model.generate([1, 2, 3], 20, stop_ids={greedy[4]}) == greedy[:greedy.index(greedy[4])]
    assert len(model.generate([1] * 60, 20, stop_ids=())) == 64 - 60 + 1
    streamed = []
    model.generate([1, 2, 3], 5, stop_ids=(), on_token=streamed.append)
    assert streamed == greedy[:5]


def test_prompt_longer_than_context_is_refused():
    config, weights = small_model()
    model = llama.Llama(config, weights)
    with pytest.raises(ValueError, match=r"70 tokens.*64 tokens"):
        model.generate([1] * 70, 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 50"):
        model.generate([1, 50], 5)


def test_from_pretrained_bad_config(tmp_path):
    config, weights = small_model()
    folder = tmp_path / "model"
    write_folder(folder, config, weights)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        llama.Llama.from_pretrained(str(folder))
    del hf["intermediate_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="missing required key 'intermediate_size'"):
        llama.Llama.from_pretrained(str(folder))


def test_cli_generate(capsys):
    checkpoint = model_path("stories260K.bin")
    tokenizer = model_path("tok512.bin")
    assert llama.main(["generate", "--checkpoint", checkpoint, "--tokenizer", tokenizer, "--temperature", "0",
                       "--steps", "25", "--prompt", "Once upon a time"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time, there was a little girl named Lily.")
    assert "prefill: 5 tokens" in err and "decode: " in err and "tok/s" in err
    args = ["generate", "--checkpoint", checkpoint, "--tokenizer", tokenizer, "--seed", "3", "--steps", "20"]
    assert llama.main(args) == 0
    first = capsys.readouterr().out
    assert llama.main(args) == 0
    assert capsys.readouterr().out == first


def test_cli_refuses_mismatched_tokenizer_and_corrupt_checkpoint(tmp_path, capsys):
    checkpoint = model_path("stories260K.bin")
    assert llama.main(["generate", "--checkpoint", checkpoint, "--tokenizer", model_path("tokenizer.bin")]) == 2
    err = capsys.readouterr().err
    assert "32000 tokens" in err and "512" in err
    bad = tmp_path / "cut.bin"
    bad.write_bytes(open(checkpoint, "rb").read()[:1000])
    assert llama.main(["generate", "--checkpoint", str(bad), "--tokenizer", model_path("tok512.bin")]) == 2
    err = capsys.readouterr().err
    assert "cut.bin" in err and "1000 bytes" in err and str(os.path.getsize(checkpoint)) in err


# ----------------------------------------------------------------------------------------------------------------
# training (issue 5)


def train_config(**changes):
    fields = dict(steps=6, batch_size=4, seq_len=16, accum=1, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=3,
                  eval_batches=2, seed=0)
    fields.update(changes)
    return llama.TrainConfig(**fields)


def byte_model_config(**changes):
    fields = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, max_seq_len=16,
                  tie_word_embeddings=True, bos_token_id=256, eos_token_id=256)
    fields.update(changes)
    return llama.LlamaConfig(**fields)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few KB of Python source: llama.py's own opening."""
    path = tmp_path_factory.mktemp("data") / "code.py"
    with open(llama.__file__, encoding="utf-8") as f:
        path.write_text(f.read()[:6000], encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("tied", [True, False])
def test_train_step_matches_torch(tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = byte_model_config(tie_word_embeddings=tied)
    # the micro-batch shape is the other training tests', so their kernels are compiled once
    cfg = train_config(accum=2, batch_size=4, grad_clip=0.5, weight_decay=0.1, lr=1e-3)
    weights = llama.Llama.init_weights(config, seed=3)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 257, 500).astype(np.uint16)
    model = llama.Llama(config, weights, requires_grad=True)
    trainer = llama.Trainer(model, cfg, llama.Corpus(stream, stream, "random"), out="unused", log=None)
    x, y = llama.sample_windows(stream, rng, (cfg.accum, cfg.batch_size), cfg.seq_len)
    loss = trainer.train_step(pg.Tensor(x), pg.Tensor(y)).item()

    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf(), attn_implementation="eager"))
    ref.load_state_dict({name: torch.from_numpy(np.array(w)) for name, w in weights.items()}, strict=False)
    params = list(ref.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    want = 0.0
    for i in range(cfg.accum):
        logits = ref(torch.from_numpy(x[i]).long()).logits
        micro = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), torch.from_numpy(y[i]).long().reshape(-1))
        (micro / cfg.accum).backward()
        want += micro.item() / cfg.accum
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    assert norm > cfg.grad_clip   # the clip is active, so it is tested
    opt.step()
    assert abs(loss - want) / want < 1e-5
    updated = dict(ref.named_parameters())
    for name, tensor in model.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), updated[name].detach().numpy(), rtol=0, atol=1e-5, err_msg=name)
        assert not np.array_equal(tensor.numpy(), weights[name]), name


def test_lr_schedule():
    cfg = train_config(steps=100, warmup=10, lr=1e-2, min_lr=1e-3)
    assert llama.lr_at(0, cfg) == pytest.approx(1e-3) and llama.lr_at(9, cfg) == pytest.approx(1e-2)
    assert llama.lr_at(55, cfg) == pytest.approx(5.5e-3)
    assert llama.lr_at(100, cfg) == pytest.approx(1e-3)
    lrs = [llama.lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_stdlib_corpus_and_unigram_baseline():
    corpus = llama.load_corpus(None, 64)
    assert len(corpus.train) > 10 * len(corpus.val) / 2 > 100_000
    for stream in (corpus.train, corpus.val):
        assert stream[0] == 256 and stream.max() == 256 and (stream == 256).sum() > 10
    baseline = llama.unigram_loss(corpus.train, corpus.val, 257)
    assert 2.5 < baseline < 4.0   # bytes of Python source: a few bits each
    x, y = llama.sample_windows(corpus.train, np.random.default_rng(0), (2, 3), 64)
    assert x.shape == y.shape == (2, 3, 64) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])


def test_save_load_gives_identical_logits(tmp_path, text_file):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    trainer = llama.train(train_config(steps=2, data=text_file), byte_model_config(), out=str(tmp_path / "run"),
                          log=lambda *a: None)
    folder = tmp_path / "run"
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
            "trainer_state.json"} <= set(os.listdir(folder))
    tokens = np.random.default_rng(0).integers(0, 257, (2, 16)).astype(np.int32)
    with pg.no_grad():
        want = trainer.model.logits(pg.Tensor(tokens)).numpy()
    np.testing.assert_array_equal(llama.Llama.from_pretrained(str(folder)).logits(pg.Tensor(tokens)).numpy(), want)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(theirs - want).max() / np.abs(want).max() < 1e-4
    tokenizers = pytest.importorskip("tokenizers")
    assert tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode("hé").ids == [256, 104, 195, 169]
    assert llama.Tokenizer.from_file(str(folder)).encode("hé") == [256, 104, 195, 169]


def test_resume_after_ctrl_c_repeats_the_loss_curve(tmp_path, text_file, capsys):
    cfg = train_config(data=text_file)
    whole = llama.train(cfg, byte_model_config(), out=str(tmp_path / "whole"), log=lambda *a: None)
    assert whole.outcome == "done" and len(whole.history["train"]) == 6 and len(whole.history["val"]) == 2

    def interrupt(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C: the step finishes, a checkpoint is saved

    cut = llama.train(cfg, byte_model_config(), out=str(tmp_path / "cut"), on_step=interrupt)
    assert cut.outcome == "interrupted" and cut.step == 4
    assert "interrupted after step 4" in capsys.readouterr().out
    resumed = llama.train(resume=str(tmp_path / "cut"), out=str(tmp_path / "cut"), log=lambda *a: None)
    assert resumed.outcome == "done"
    assert resumed.history == whole.history
    np.testing.assert_array_equal(resumed.model.weights["model.norm.weight"].numpy(),
                                  whole.model.weights["model.norm.weight"].numpy())


def test_time_budget_sets_the_step_count_during_warmup(tmp_path, text_file):
    # a budget already spent when the first steps are timed: training stops there, with a checkpoint
    cfg = train_config(data=text_file, steps=50, warmup=5, time_budget=1e-3)
    trainer = llama.train(cfg, byte_model_config(), out=str(tmp_path / "run"), log=lambda *a: None)
    assert trainer.outcome == "done" and trainer.step == 4 and trainer.cfg.steps == 4
    assert trainer.history["val"][-1][0] == 4
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["train_config"]["steps"] == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file, capsys):
    def poison(trainer):
        if trainer.step == 3:
            norm = trainer.model.weights["model.norm.weight"]
            with pg.no_grad():
                norm.assign(pg.full(norm.shape, float("nan"))).realize()

    out = tmp_path / "run"
    trainer = llama.train(train_config(data=text_file), byte_model_config(), out=str(out), on_step=poison)
    assert trainer.outcome == "diverged" and trainer.step == 3
    assert "loss is nan at step 4" in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    _, weights = llama.load_hf(str(out))
    assert all(np.isfinite(w).all() for w in weights.values())
    assert not llama.save_checkpoint(str(tmp_path / "other"), trainer.model)


def test_train_bad_input_fails_before_training(tmp_path, text_file):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x = 1\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"print('ok')\n" * 10 + b"\xff\xfe" + b"more\n" * 10)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (dict(data=str(tiny)), str(tmp_path / "a"), r"tiny\.txt holds 6 bytes.*one training sequence of 17 tokens"),
        (dict(data=str(binary)), str(tmp_path / "b"), r"binary\.txt is not UTF-8 text: byte 0xff at offset 120"),
        (dict(data=text_file), str(blocker / "out"), r"cannot write checkpoints to .*file/out"),
    ]
    for changes, out, message in cases:
        steps = []
        with pytest.raises(ValueError, match=message):
            llama.train(train_config(**changes), byte_model_config(), out=out, on_step=steps.append)
        assert steps == []


def test_cli_train_then_generate(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # the text plot
    out = str(tmp_path / "run")
    args = ["train", "--data", text_file, "--steps", "3", "--out", out, "--dim", "32", "--n-layers", "2",
            "--n-kv-heads", "2", "--hidden-dim", "64", "--seq-len", "16", "--batch-size", "4", "--eval-every", "2",
            "--sample-tokens", "8", "--warmup", "1"]
    assert llama.main(args) == 0
    text = capsys.readouterr().out
    assert "unigram baseline" in text and "validation loss" in text and "sample:" in text and "* train" in text
    assert llama.main(["generate", "--checkpoint", out, "--steps", "5", "--seed", "1"]) == 0
    assert "decode:" in capsys.readouterr().err
    assert llama.main(["train", "--data", str(tmp_path / "missing.txt"), "--out", out]) == 2
    assert "missing.txt" in capsys.readouterr().err

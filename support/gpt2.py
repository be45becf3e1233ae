"""
GPT-2's own weights, from a local Hugging Face folder (config.json plus model.safetensors or
pytorch_model.bin), into model.GPT: no download and no dependency beyond torch. The safetensors format is
read by hand (it is a JSON header and raw bytes); Hugging Face's GPT-2 stores its linear layers as Conv1D,
whose weight is the transpose of nn.Linear's.
"""

import json
import math
import struct
from pathlib import Path

import torch

from model import GPT, GPTConfig
from support.errors import LoadError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Conv1D weights are (in, out): transposed into nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EXPECTED = "config.json plus model.safetensors or pytorch_model.bin (a Hugging Face GPT-2 folder)"


def read_safetensors(path):
    """The safetensors format: 8 bytes (little-endian u64) = N, then N bytes of JSON describing each
    tensor (dtype, shape, byte range), then the raw bytes of all tensors."""
    path = Path(path)
    broken = f"{path}: not a complete safetensors file"
    raw = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if 8 + n > len(raw):
            raise ValueError(f"header of {n} bytes, file of {len(raw)}")
        header = json.loads(raw[8 : 8 + n])
    except (struct.error, ValueError) as e:
        raise LoadError(f"{broken} ({e}); download or save it again") from None
    data = bytearray(raw[8 + n :])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{broken}: tensor '{name}' has an unreadable entry {info}") from None
        count = math.prod(shape)
        if end > len(data) or end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise LoadError(f"{broken}: tensor '{name}' needs bytes {begin}..{end}, the file holds {len(data)} "
                            "(cut short?); download or save it again")
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape).clone()
    return tensors


def gpt2_config(folder, attn_impl="auto"):
    """Our GPTConfig from a Hugging Face GPT-2 config.json; every field that changes the maths is read,
    and one we do not implement is refused by name rather than silently ignored."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e}); restore the Hugging Face config.json") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{path}: expected a JSON object")
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # Hugging Face's names
    activation = hf.get("activation_function", "gelu_new")
    if hf.get("model_type", "gpt2") != "gpt2" or activation not in gelu:
        raise LoadError(f"{path}: not a GPT-2 config (model_type={hf.get('model_type')}, "
                        f"activation_function={hf.get('activation_function')})")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if isinstance(hf.get(key), bool) or not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise LoadError(f"{path}: field '{key}' is missing or not a positive integer ({hf.get(key)!r})")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise LoadError(f"{path}: n_inner={hf['n_inner']} is not supported (the MLP here is 4 * n_embd wide)")
    if hf.get("add_cross_attention"):
        raise LoadError(f"{path}: add_cross_attention is not supported (a decoder-only GPT-2 is expected)")
    # reorder_and_upcast_attn only changes the precision of the scores (fp32 on the GPU); accepted.
    return GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), attn_impl=attn_impl,
        tie_word_embeddings=hf.get("tie_word_embeddings", True), scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        gelu_approximate=gelu[activation],
    )


def read_state_dict(folder):
    """The tensors of model.safetensors (preferred) or pytorch_model.bin, by their Hugging Face names."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if not (folder / "pytorch_model.bin").is_file():
        raise LoadError(f"{folder}: no model.safetensors or pytorch_model.bin; expected {EXPECTED}")
    try:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # a file cut short, or not a state dict; torch's own message is long
        raise LoadError(f"{folder}/pytorch_model.bin: cannot be read ({type(e).__name__}); was it fully "
                        "downloaded?") from None
    if not isinstance(state, dict):
        raise LoadError(f"{folder}/pytorch_model.bin: not a state dict of tensors")
    return state


def load_gpt2_weights(folder, attn_impl="auto"):
    """A GPT from a local Hugging Face GPT-2 folder: config.json plus model.safetensors or pytorch_model.bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: no such folder; --weights must point at {EXPECTED}")
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder}: config.json is missing; expected {EXPECTED}")
    config = gpt2_config(folder, attn_impl)
    state = read_state_dict(folder)
    try:
        model = GPT(config)
    except ValueError as e:  # a shape the model cannot take (n_embd not a multiple of n_head, ...)
        raise LoadError(f"{folder}/config.json: {e}") from None
    ours = model.state_dict()
    loaded = {}
    for name, tensor in state.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if key.endswith(("attn.bias", "attn.masked_bias")) and key not in ours:
            continue  # old checkpoints store the causal mask as a buffer; we build it on the fly
        if key not in ours:
            raise LoadError(f"{folder}: unexpected tensor '{name}' for GPT-2; is this a GPT-2 checkpoint?")
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if tensor.shape != ours[key].shape:
            raise LoadError(f"{folder}: '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(ours[key].shape)}")
        loaded[key] = tensor
    if config.tie_word_embeddings:
        loaded["lm_head.weight"] = loaded.get("transformer.wte.weight")  # one matrix, often stored once
    missing = [k for k in ours if loaded.get(k) is None]
    if missing:
        raise LoadError(f"{folder}: weights are missing {len(missing)} tensors (first: {missing[0]})")
    model.load_state_dict(loaded)
    return model

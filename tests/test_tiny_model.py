"""The tiny-model maker: complete Hugging Face directories, made offline."""

import json

import pytest

from engine.errors import EngineConfigError
from engine.tiny_model import ModelShape, make_model, validate_shape


def test_directory_is_complete_and_loads_with_transformers(make_tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = make_tiny_model("llama")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (model_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.model_type, config.hidden_size, config.num_key_value_heads) == ("llama", 128, 2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "naïve café 東京"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_same_seed_gives_the_same_weights(tmp_path):
    a = make_model(tmp_path / "a", ModelShape(seed=3))
    b = make_model(tmp_path / "b", ModelShape(seed=3))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "tokenizer.json").read_text()) == json.loads((b / "tokenizer.json").read_text())


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(make_tiny_model, arch):
    config = json.loads((make_tiny_model(arch) / "config.json").read_text())
    assert config["model_type"] == arch


def test_unsupported_head_dim_is_refused_with_the_supported_list():
    with pytest.raises(EngineConfigError, match=r"head_dim 30 .*supported head sizes: \[32, 64"):
        validate_shape(ModelShape(hidden_size=120, heads=4))


@pytest.mark.parametrize(
    "shape,field",
    [
        (ModelShape(heads=4, kv_heads=3), "kv_heads"),
        (ModelShape(hidden_size=130, heads=4), "heads"),
        (ModelShape(vocab_size=100), "vocab_size"),
        (ModelShape(layers=0), "layers"),
        (ModelShape(arch="gpt2"), "arch"),
    ],
)
def test_bad_shapes_name_the_field(shape, field):
    with pytest.raises(EngineConfigError) as info:
        validate_shape(shape)
    assert info.value.field == field

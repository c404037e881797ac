"""Hugging Face folders -> our models: a Llava folder as a joint_decoder VLM (parity with
transformers, strict weights, clear errors), a pretrained Llama decoder through
``model.pretrained`` (first-step loss equals transformers'), its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_config import JobConfig
from vlm_strategies import causal_lm_loss
from vlm_train.errors import VLMTrainError
from vlm_train.hf_import import load_llava, pretrained_chat_template, pretrained_tokenizer
from vlm_transformer import ModalityContext

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.15,
}
TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


def _randomise_norms(model: Any) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.uniform_(0.5, 1.5)


def _llava(tmp: Path, family: str, *, tied: bool = False, **over: Any) -> tuple[Path, Any]:
    torch.manual_seed(5)
    if family == "siglip":
        vision: Any = transformers.SiglipVisionConfig(**TOWER, vision_use_head=True)
        strategy, layer = "full", -1
    else:
        vision = transformers.CLIPVisionConfig(**TOWER)
        strategy, layer = "default", -2
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**TEXT, tie_word_embeddings=tied),
        image_token_index=99,
        vision_feature_layer=over.pop("vision_feature_layer", layer),
        vision_feature_select_strategy=over.pop("vision_feature_select_strategy", strategy),
        tie_word_embeddings=tied,
        **over,
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    _randomise_norms(model)
    folder = tmp / f"llava-{family}"
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize(("family", "tied"), [("siglip", False), ("clip", True)])
def test_llava_import_parity(tmp_path: Path, family: str, tied: bool) -> None:
    folder, hf = _llava(tmp_path, family, tied=tied)
    model, job = load_llava(folder)
    assert job.encoder.type == family and job.adapter.type == "mlp_2layer"
    assert job.model.tie_embeddings is tied and job.model.vocab_size == 100
    n = model.num_image_tokens
    assert n == 16
    for batch in (1, 3):
        torch.manual_seed(batch)
        pixels = torch.randn(batch, 3, 32, 32)
        text = torch.randint(0, 99, (batch, 10))
        hf_ids = torch.cat((torch.full((batch, n), 99), text), dim=1)
        with torch.no_grad():
            ref = hf(input_ids=hf_ids, pixel_values=pixels).logits[:, n:]
            ctx = ModalityContext(prefix_embeds=model.encode_images(pixels)[0])
            got = model.transformer(text, ctx)
        diff = float((got - ref).abs().max())
        ours = model.generate(pixels, text, max_new_tokens=6)[:, -6:]
        theirs = hf.generate(
            input_ids=hf_ids,
            attention_mask=torch.ones_like(hf_ids),
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, -6:]
        print(
            f"\n[import] llava/{family} batch {batch}: max |logit diff| = {diff:.3e}; "
            f"identical greedy tokens: {torch.equal(ours, theirs)}"
        )
        assert ref.abs().max() > 0.5
        assert diff <= 1e-4
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("family", "over", "message"),
    [
        ("siglip", {"vision_feature_select_strategy": "default"}, "needs 'full'"),
        ("clip", {"vision_feature_select_strategy": "full"}, "needs 'default'"),
        ("clip", {"vision_feature_layer": [-2, -1]}, "concatenates several layers"),
        ("siglip", {"projector_hidden_act": "gelu_new"}, "is not an mlp_2layer"),
    ],
)
def test_llava_import_rejects(
    tmp_path: Path, family: str, over: dict[str, Any], message: str
) -> None:
    folder, _ = _llava(tmp_path, family, **over)
    with pytest.raises(VLMTrainError, match=message):
        load_llava(folder)


def test_llava_import_wrong_tower_family_and_weights(tmp_path: Path) -> None:
    folder, _ = _llava(tmp_path, "siglip")
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_config"]["model_type"] = "pixtral"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(VLMTrainError, match="vision tower 'pixtral' is not supported"):
        load_llava(folder)
    folder, _ = _llava(tmp_path / "w", "siglip")
    state = load_file(str(folder / "model.safetensors"))
    del state["multi_modal_projector.linear_2.bias"]
    state["multi_modal_projector.linear_3.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    with pytest.raises(VLMTrainError) as err:
        load_llava(folder)
    assert "missing ['adapter.fc2.bias']" in str(err.value)
    assert "adapter.fc3.weight" in str(err.value) or "linear_3" in str(err.value)
    llama = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).save_pretrained(llama)
    with pytest.raises(VLMTrainError, match="holds a 'llama' model, not a Llava"):
        load_llava(llama)


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "one", "red", "dog"]


def _pretrained_llama(tmp: Path, vocab: int = 100) -> tuple[Path, Any]:
    from vlm_train.tokenizer import TextTokenizer

    torch.manual_seed(11)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TEXT, "vocab_size": vocab}, tie_word_embeddings=True)
    ).eval()
    _randomise_norms(hf)
    folder = tmp / "tiny-llama"
    hf.save_pretrained(folder)
    TextTokenizer.train([" ".join(WORDS)], kind="wordlevel").save(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]", "chat_template": "{{ x }}"})
    )
    return folder, hf


def _pretrained_job(folder: Path, **model: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {"pretrained": str(folder), "max_seq_len": 48, **model},
            "encoder": {"type": "siglip", "tower": TOWER},
            "adapter": {"type": "mlp_2layer"},
            "arch": {"arch": "joint_decoder", "max_text_len": 16},
        }
    )


def test_pretrained_decoder_first_step_loss_equals_transformers(tmp_path: Path) -> None:
    from vlm_config import ParallelConfig
    from vlm_parallel import build_parallel_vlm, init_distributed

    folder, hf = _pretrained_llama(tmp_path)
    job = _pretrained_job(folder)
    assert (job.model.dim, job.model.n_layers, job.model.kv_heads) == (64, 2, 2)
    assert job.model.tie_embeddings is True and job.model.max_seq_len == 48
    tok = pretrained_tokenizer(folder, job.model.vocab_size)
    assert pretrained_chat_template(folder) == "{{ x }}"
    ids = torch.tensor(
        [[tok.bos_id, *tok.encode("the cat sat on a mat"), tok.eos_id]] * 2, dtype=torch.long
    )
    ids[1, 2] = tok.encode("dog")[0]
    model = build_parallel_vlm(job, init_distributed(ParallelConfig(), device="cpu"))
    with torch.no_grad():
        ours = causal_lm_loss(model.transformer(ids), ids)
        theirs = hf(input_ids=ids, labels=ids).loss
    print(f"\n[pretrained] first-step text loss: ours {ours:.6f}, transformers {theirs:.6f}")
    assert abs(float(ours) - float(theirs)) <= 1e-5
    assert float(theirs) > 1.0  # a random LM: the loss is far from zero


def test_pretrained_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    from pydantic import ValidationError

    folder, _ = _pretrained_llama(tmp_path, vocab=10)
    with pytest.raises(ValidationError, match="model.n_layers = 3 but .* num_hidden_layers = 2"):
        _pretrained_job(folder, n_layers=3)
    with pytest.raises(ValidationError, match="model.n_heads = 8 but .* num_attention_heads = 4"):
        _pretrained_job(folder, n_heads=8)
    with pytest.raises(VLMTrainError, match="has 16 tokens but model.vocab_size is 10"):
        pretrained_tokenizer(folder, _pretrained_job(folder).model.vocab_size)

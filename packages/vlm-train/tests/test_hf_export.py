"""``vlm export --format hf``: our models vs transformers on the exported folder, with no
code of ours on the transformers side (logits and greedy tokens), and every model that
has no transformers equivalent as one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlm_config import JobConfig
from vlm_strategies import VLMWrapper, build_vlm
from vlm_train.hf_export import ExportError, export_hf, llava_prompt
from vlm_train.tokenizer import TextTokenizer
from vlm_transformer import ModalityContext, generate

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

WORDS = [
    "a",
    "cat",
    "dog",
    "sits",
    "on",
    "the",
    "mat",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "one",
    "two",
    "three",
]
TOWER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


def _tokenizer() -> TextTokenizer:
    return TextTokenizer.train([" ".join(WORDS)], kind="wordlevel")


def _tower_folder(tmp: Path, family: str) -> Path:
    torch.manual_seed(3)
    if family == "siglip":
        tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER))
    else:
        tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER))
    folder = tmp / family
    tower.save_pretrained(folder)
    return folder


def _job(tower: Path, family: str, vocab: int, **over: Any) -> JobConfig:
    raw: dict[str, Any] = {
        "model": {
            "dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "vocab_size": vocab,
            "max_seq_len": 64,
            "init_std": 0.15,
            **over.pop("model", {}),
        },
        "encoder": {"type": family, "path": str(tower), **over.pop("encoder", {})},
        "adapter": {"type": "mlp_2layer", **over.pop("adapter", {})},
        "arch": {"arch": "joint_decoder", "max_text_len": 16, **over.pop("arch", {})},
    }
    raw.update(over)
    return JobConfig.model_validate(raw)


def _model(job: JobConfig) -> VLMWrapper:
    torch.manual_seed(0)
    model = build_vlm(job).eval()
    with torch.no_grad():  # non-trivial adapter biases and norm weights
        for name, p in model.named_parameters():
            if name.startswith("transformer.") and "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.startswith("adapter.") and name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _images(n: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(7)
    return [
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=gen).byte().numpy())
        for _ in range(n)
    ]


def _compare(
    model: VLMWrapper, tok: TextTokenizer, folder: Path, prompts: list[str], tag: str
) -> None:
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    images = _images(len(prompts))
    bos = processor.tokenizer.bos_token
    inputs = processor(
        images=images,
        text=[llava_prompt(p, bos) for p in prompts],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    n, vocab = model.num_image_tokens, model.transformer.config.vocab_size
    pixels = model.vision_encoder.preprocess(images)
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    # Llava's rows are [pad...] <image> x n [BOS] prompt; ours: image prefix, then the
    # left-padded text [pad...] [BOS] prompt.  Dropping the image placeholders gives ours.
    placeholders = inputs["input_ids"] == hf.config.image_token_index
    assert (placeholders.sum(dim=1) == n).all()
    batch = len(prompts)
    ids = inputs["input_ids"][~placeholders].view(batch, -1)
    mask = inputs["attention_mask"][~placeholders].view(batch, -1).bool()
    with torch.no_grad():
        ref = hf(**inputs).logits[~placeholders].view(batch, ids.shape[1], -1)[..., :vocab]
        ctx = ModalityContext(
            prefix_embeds=model.encode_images(pixels)[0],
            key_padding_mask=torch.cat((torch.ones(batch, n, dtype=torch.bool), mask), dim=1),
        )
        got = model.transformer(ids, ctx)
    diff = float((got[mask] - ref[mask]).abs().max())
    steps = 6
    ours = model.generate(pixels, ids, max_new_tokens=steps, attention_mask=mask)[:, -steps:]
    theirs = hf.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None)
    same = torch.equal(ours, theirs[:, -steps:])
    print(f"\n[export] {tag}: max |logit diff| = {diff:.3e}; identical greedy tokens: {same}")
    assert ref.abs().max() > 0.5
    assert diff <= 1e-4
    assert same, (ours, theirs[:, -steps:])


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_llava_export_parity(tmp_path: Path, family: str) -> None:
    tok = _tokenizer()
    job = _job(_tower_folder(tmp_path, family), family, vocab=tok.vocab_size)
    model = _model(job)
    folder = export_hf(model, job, tok, tmp_path / "out")
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert hf.config.image_token_index == tok.vocab_size  # appended: the vocab was full
    assert hf.config.vision_feature_select_strategy == ("full" if family == "siglip" else "default")
    _compare(model, tok, folder, ["a cat"], f"llava/{family} one image")
    _compare(
        model, tok, folder, ["a cat on the mat", "big", "two red dog"], f"llava/{family} batch of 3"
    )


def test_llama_export_parity(tmp_path: Path) -> None:
    tok = _tokenizer()
    job = _job(_tower_folder(tmp_path, "siglip"), "siglip", vocab=tok.vocab_size + 12)
    model = _model(job)
    folder = export_hf(model, job, tok, tmp_path / "llama", decoder_only=True)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto.convert_tokens_to_ids("cat") == tok.encode("cat")[0]
    ids = torch.tensor([[tok.bos_id, *tok.encode(t)] for t in ("a cat sits", "the red mat")])
    with torch.no_grad():
        diff = float((model.transformer(ids) - hf(ids).logits).abs().max())
    ours = generate(model.transformer, ids, max_new_tokens=6)[:, -6:]
    theirs = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, -6:]
    same = torch.equal(ours, theirs)
    print(f"\n[export] llama: max |logit diff| = {diff:.3e}; identical greedy tokens: {same}")
    assert diff <= 1e-4 and same


def test_llava_export_with_spare_vocab_reuses_an_id(tmp_path: Path) -> None:
    tok = _tokenizer()
    job = _job(_tower_folder(tmp_path, "siglip"), "siglip", vocab=tok.vocab_size + 4)
    model = _model(job)
    folder = export_hf(model, job, tok, tmp_path / "out")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder)
    assert hf.config.image_token_index == tok.vocab_size  # first id the tokenizer leaves free
    assert hf.config.text_config.vocab_size == tok.vocab_size + 4  # no resize
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.suppress_tokens == [tok.vocab_size]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"arch": {"arch": "mot"}}, "arch 'mot' to Hugging Face: transformers has no equivalent"),
        ({"arch": {"arch": "moma"}}, "arch 'moma' to Hugging Face"),
        ({"arch": {"arch": "cross_attention"}}, "arch 'cross_attention' to Hugging Face"),
        ({"arch": {"prefix_bidirectional": True}}, "prefix_bidirectional=true"),
        ({"adapter": {"type": "linear"}}, "adapter 'linear' to Llava"),
        ({"adapter": {"type": "avgpool"}}, "adapter 'avgpool' to Llava"),
        ({"adapter": {"hidden_dim": 32}}, "hidden_dim=32 to Llava"),
        ({"encoder": {"post_layernorm": True}}, "post_layernorm=true"),
        ({"model": {"vocab_size": 8}}, "the tokenizer has 19 tokens but model.vocab_size is 8"),
    ],
)
def test_llava_export_rejects(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    job = _job(_tower_folder(tmp_path, "siglip"), "siglip", vocab=19, **over)
    with pytest.raises(ExportError, match=message):
        export_hf(build_vlm(job), job, _tokenizer(), tmp_path / "out")


def test_export_rejects_random_encoder_and_non_dense_decoder(tmp_path: Path) -> None:
    job = JobConfig.model_validate(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 19},
            "encoder": {"type": "random", "num_tokens": 4, "feature_dim": 8},
            "arch": {"arch": "cross_attention"},
        }
    )
    model = build_vlm(job)
    with pytest.raises(ExportError, match="arch 'cross_attention'"):
        export_hf(model, job, _tokenizer(), tmp_path / "a")
    with pytest.raises(ExportError, match="not a dense Llama .* LlamaForCausalLM cannot"):
        export_hf(model, job, _tokenizer(), tmp_path / "b", decoder_only=True)
    dense = JobConfig.model_validate({**job.model_dump(), "arch": {"arch": "joint_decoder"}})
    with pytest.raises(ExportError, match="encoder 'random' to Llava: it needs a siglip or clip"):
        export_hf(build_vlm(dense), dense, _tokenizer(), tmp_path / "c")


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm_config.cli import main
    from vlm_parallel import export_consolidated

    tok = _tokenizer()
    job = _job(_tower_folder(tmp_path, "clip"), "clip", vocab=tok.vocab_size)
    model = _model(job)
    run = export_consolidated(model, job, tmp_path / "final")
    tok.save(run)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    _compare(model, tok, tmp_path / "hf", ["a dog", "one"], "llava/clip via `vlm export`")
    # non-empty target, missing run: one error line, exit code 1
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1

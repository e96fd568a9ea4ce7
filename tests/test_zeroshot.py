"""Zero-shot: the checkpoint in mSTAR's official layout, read by an independent copy of the official loading code;
`mstar zeroshot` scores equal to the official method computed here; MI-Zero top-j pooling by hand; the tiny
toy world (real slides, stage 1, stage 2, extraction) classifies held-apart slides above chance.

The "official" code below was written for this test from ``downstream_task/zeroshot_classification`` of
github.com/Innse/mSTAR at commit 7608e7f2800951f2fab8319c351ddbe617d5bc91 (the last commit that has it):
``models/mSTAR.py`` (``Text_encoder``), ``utils/zeroshot_path.py`` (``zero_shot_classifier``, ``topj_pooling``,
``run_mizero``'s proj loading and logits).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mstar_extract.console import Reporter
from mstar_extract.downstream.scoring import balanced_accuracy, topj_pooling
from mstar_extract.store.bags import write_bag

DIM = 16


def cli(*args: object):
    """The real command line, in this process."""
    from click.testing import CliRunner

    from mstar_extract.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    r.returncode = r.exit_code
    return r


# ------------------------------------------------------------------------------ the official code, re-written
class OfficialTextEncoder(nn.Module):
    """``Text_encoder`` of models/mSTAR.py: AutoModelForMaskedLM + proj_text; CLS of ``.bert`` → proj_text."""

    def __init__(self, name: str, hidden: int, out: int) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForMaskedLM

        config = AutoConfig.from_pretrained(name)
        self.text_encoder = AutoModelForMaskedLM.from_pretrained(name, config=config)
        self.proj_text = nn.Linear(hidden, out)

    def forward(self, reports: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj_text(self.text_encoder.bert(input_ids=reports, attention_mask=attention_mask)[0][:, 0, :])


def official_load_text(ckpt_path: Path, name: str, hidden: int, out: int) -> tuple[OfficialTextEncoder, object]:
    model = OfficialTextEncoder(name, hidden, out)
    checkpoint = torch.load(ckpt_path, map_location="cpu")  # torch >= 2.6: weights_only=True by default
    params = {k.replace("module.", ""): v for k, v in checkpoint["model_state_dict"].items() if "text_encoder" in k}
    params.update({k.replace("module.", ""): v for k, v in checkpoint["model_state_dict"].items() if "proj_text" in k})
    msg = model.load_state_dict(params, strict=True)
    return model.eval(), msg


def official_load_proj(ckpt_path: Path, d_in: int, d_out: int) -> nn.Linear:
    proj = nn.Linear(d_in, d_out)
    ckpt = torch.load(ckpt_path, map_location="cpu")["model_state_dict"]
    updated = {}
    for k, v in ckpt.items():
        k = k.replace("module.", "")
        if k in ["proj.weight", "proj.bias"]:
            updated[k.replace("proj.", "")] = v
    proj.load_state_dict(updated)  # strict, as the official code
    return proj


@torch.no_grad()
def official_classifier(model: OfficialTextEncoder, tokenizer, classnames: list[list[str]], templates: list[str],
                        max_length: int) -> torch.Tensor:
    """``zero_shot_classifier`` (mSTAR branch). It pads to max_length=512; the tiny test BERT has 128 positions,
    so the checkpoint's max_tokens is used instead."""
    weights = []
    for names in classnames:
        per = []
        for name in names:
            texts = [t.replace("CLASSNAME", name) for t in templates]
            tok = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt", max_length=max_length)
            per.append(F.normalize(model(tok["input_ids"], tok["attention_mask"]), dim=-1))
        emb = torch.stack(per, dim=0).mean(dim=(0, 1))
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


def official_topj(logits: torch.Tensor, topj=(1, 5, 10, 50, 100)) -> tuple[dict, dict]:
    maxj = min(max(topj), logits.size(0))
    values, _ = logits.topk(maxj, 0, True, True)
    pooled = {j: values[: min(j, maxj)].mean(dim=0, keepdim=True) for j in topj}
    return {j: v.argmax(dim=1) for j, v in pooled.items()}, pooled


# ------------------------------------------------------------------------------ pooling and metrics by hand
def test_topj_pooling_matches_a_hand_computation() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.7, 0.6, 0.5], [0.1, 0.7, 0.45]])
    got = topj_pooling(logits, (1, 2, 3, 10))
    # each class takes its own top patches: class 0 -> .9, .7, .2; class 1 -> .8, .7, .6; class 2 -> .5, .45, .4
    assert got[1][0] == 0 and torch.allclose(got[1][1], torch.tensor([0.9, 0.8, 0.5]))
    assert got[2][0] == 0 and torch.allclose(got[2][1], torch.tensor([0.8, 0.75, 0.475]))
    assert got[3][0] == 1 and torch.allclose(got[3][1], torch.tensor([0.6, 0.7, 0.45]))
    assert torch.allclose(got[10][1], logits.mean(dim=0))  # j > N: every patch
    preds, pooled = official_topj(logits, (1, 2, 3, 10))
    for j in (1, 2, 3, 10):
        assert got[j][0] == int(preds[j]) and torch.allclose(got[j][1], pooled[j][0])


def test_balanced_accuracy_is_the_mean_recall_of_the_true_classes() -> None:
    y, p = [0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 0, 1]
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)


# ------------------------------------------------------------------------------ a stage-1 run and bags
def make_bag(path: Path, feats: np.ndarray, model: str = "timm:test_vit", sha: str = "ab" * 32) -> Path:
    n = feats.shape[0]
    attrs = {"slide_id": path.stem, "slide_path": f"/slides/{path.stem}.svs", "model": model, "weights_sha256": sha,
             "feature_dim": feats.shape[1], "patch_size": 256, "patch_size_level0": 512, "target_mpp": 0.5,
             "target_magnification": 20.0, "level0_mpp": 0.25, "level0_magnification": 40.0, "level0_width": 9000,
             "level0_height": 9000, "input_size": 224, "precision": "fp32", "settings": {}}
    return write_bag(path, feats, np.stack([np.arange(n), np.zeros(n)], 1) * 512, attrs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short stage-1 run (CLS pooling, as the official code) and a stage-2 run folder's exports."""
    from mstar_extract.pretrain import stage1
    from mstar_extract.pretrain.config import load_config
    from mstar_extract.pretrain.stage1.config import Stage1Config
    from mstar_extract.pretrain.stage1.toydata import make_toy_dataset, toy_overrides
    from mstar_extract.pretrain.zeroshot_export import official_proj

    root = tmp_path_factory.mktemp("zeroshot")
    toy = make_toy_dataset(root / "toy", n_slides=20, n_types=3, feature_dim=DIM, n_genes=12, patches=(10, 30), seed=2)
    cfg = load_config(Stage1Config, None, toy_overrides(toy, root / "stage1", DIM)
                      + ["train.max_steps=2", "train.batch_size=8", "text.pooling=cls"])
    assert stage1.main(cfg, reporter=Reporter(verbosity=-1)) == 0
    s2 = root / "stage2"
    s2.mkdir()
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)  # student features 64-d -> the 32-d joint space of the toy stage 1
    torch.save(official_proj(lin.weight, lin.bias), s2 / "proj.pth")
    (s2 / "model_card.json").write_text(json.dumps({"model": "timm:test_vit", "student_sha256": "ab" * 32,
                                                    "feature_dim": 64, "proj_file": "proj.pth", "teacher_sha256": "t"}))
    return {"root": root, "toy": toy, "stage1": root / "stage1", "stage2": s2, "cfg": cfg}


def our_text_embeddings(run: Path, cfg, texts: list[str]) -> torch.Tensor:
    """Report embeddings of the trained stage-1 model itself (its newest checkpoint)."""
    from mstar_extract.pretrain.checkpoint import latest_checkpoint
    from mstar_extract.pretrain.stage1.text import TextEncoder, load_tokenizer

    t = cfg.text
    enc = TextEncoder(t.model, cfg.aggregator.dim, 0, False, True, t.pooling)
    state = torch.load(latest_checkpoint(run), weights_only=True)["model"]
    enc.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
    tok = load_tokenizer(t.model, True)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return enc.eval()(tok["input_ids"], tok["attention_mask"])


def test_text_export_loads_in_the_official_code_and_embeds_like_stage_1(runs: dict) -> None:
    cfg = runs["cfg"]
    text_file = runs["stage1"] / "text_mstar.pth"
    model, msg = official_load_text(text_file, str(cfg.text.model), 32, cfg.aggregator.dim)
    assert not msg.missing_keys and not msg.unexpected_keys, msg
    texts = ["squamous keratinizing tumor", "the sections show clear cell renal", "a"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cfg.text.model))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        official = model(tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(official, our_text_embeddings(runs["stage1"], cfg, texts), rtol=1e-4, atol=1e-5)


def test_pretrain_export_writes_the_official_layout_also_from_an_older_run(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "zs.pth"
    r = cli("pretrain", "export", "--stage1", runs["stage1"], "--stage2", runs["stage2"], out, "-q")
    assert r.returncode == 0, r.output
    sd = torch.load(out, weights_only=True)["model_state_dict"]
    assert {"proj.weight", "proj.bias", "proj_text.weight", "proj_text.bias"} <= set(sd)
    assert any(k.startswith("text_encoder.bert.") for k in sd) and not any("pooler" in k for k in sd)
    _, msg = official_load_text(out, str(runs["cfg"].text.model), 32, runs["cfg"].aggregator.dim)
    assert not msg.missing_keys and not msg.unexpected_keys
    lin = official_load_proj(out, 64, 32)
    proj = torch.load(runs["stage2"] / "proj.pth", weights_only=True)["model_state_dict"]
    torch.testing.assert_close(lin.weight, proj["proj.weight"])
    # a stage-1 run from before text_mstar.pth existed: rebuilt from its newest checkpoint, the same tensors
    old = tmp_path / "old_stage1"
    shutil.copytree(runs["stage1"], old)
    (old / "text_mstar.pth").unlink()
    assert cli("pretrain", "export", "--stage1", old, "--stage2", runs["stage2"], tmp_path / "zs2.pth", "-q").returncode == 0
    sd2 = torch.load(tmp_path / "zs2.pth", weights_only=True)["model_state_dict"]
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_zeroshot_scores_equal_the_official_method(runs: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "zs.pth"
    assert cli("pretrain", "export", "--stage1", runs["stage1"], "--stage2", runs["stage2"], ckpt, "-q").returncode == 0
    prompts = {"0": {"classnames": {"squamous": ["squamous", "keratinizing"], "clear": ["clear cell", "renal"],
                                    "ductal": ["ductal"]},
                     "templates": ["CLASSNAME", "the sections show CLASSNAME tissue", "CLASSNAME ."]}}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    rng = np.random.default_rng(0)
    bags = tmp_path / "bags"
    feats = {f"s{i}": rng.normal(size=(n, 64)).astype(np.float32) for i, n in enumerate((3, 40, 120))}
    for sid, x in feats.items():
        make_bag(bags / f"{sid}.h5", x)
    make_bag(bags / "other.h5", feats["s0"], model="uni")
    (tmp_path / "labels.csv").write_text("slide_id,label\ns0,squamous\ns1,clear\ns2,clear\nzz,ductal\n")
    out = tmp_path / "out"
    r = cli("zeroshot", bags, out, "--checkpoint", ckpt, "--prompts", tmp_path / "p.json", "--labels",
            tmp_path / "labels.csv", "--topj", "1,5,10,50,100", "--device", "cpu")
    assert r.returncode == 1 and "features from model uni" in r.stderr  # the other slides are scored
    rows = {row["slide_id"]: row for row in csv.DictReader(open(out / "zeroshot.csv"))}
    # the official method, step by step
    cfg = runs["cfg"]
    text, _ = official_load_text(ckpt, str(cfg.text.model), 32, cfg.aggregator.dim)
    from transformers import AutoTokenizer

    p = prompts["0"]
    classes = list(p["classnames"])
    w = official_classifier(text, AutoTokenizer.from_pretrained(str(cfg.text.model)),
                            [p["classnames"][c] for c in classes], p["templates"], cfg.text.max_tokens)
    proj = official_load_proj(ckpt, 64, 32)
    truth = {"s0": 0, "s1": 1, "s2": 1}
    hits = {j: [] for j in (1, 5, 10, 50, 100)}
    for sid, x in feats.items():
        with torch.no_grad():
            logits = F.normalize(proj(torch.from_numpy(x)), dim=-1) @ w
        preds, pooled = official_topj(logits)
        for j in (1, 5, 10, 50, 100):
            assert rows[sid][f"pred_top{j}"] == classes[int(preds[j])]
            got = [float(rows[sid][f"score_top{j}_{c}"]) for c in classes]
            np.testing.assert_allclose(got, pooled[j][0].numpy(), rtol=1e-4, atol=1e-5)
            hits[j].append(int(preds[j]) == truth[sid])
    assert rows["other"]["error"] and not rows["other"]["pred_top1"]
    m = json.loads((out / "zeroshot_metrics.json").read_text())
    assert m["n_labelled"] == 3 and m["chance"] == pytest.approx(1 / 3) and m["classes"] == classes
    for j in (1, 5, 10, 50, 100):
        assert m["by_j"][str(j)]["accuracy"] == pytest.approx(np.mean(hits[j]))
    # a checkpoint without our text record (as mSTAR's authors would publish one) + --text-model: same scores
    official = torch.load(ckpt, weights_only=True)
    torch.save({"model_state_dict": official["model_state_dict"]}, tmp_path / "bare.pth")
    r = cli("zeroshot", bags / "s1.h5", tmp_path / "out2", "--checkpoint", tmp_path / "bare.pth", "--prompts",
            tmp_path / "p.json", "--text-model", cfg.text.model, "--device", "cpu")
    assert r.returncode == 0 and "does not record its patch extractor" in r.stderr
    again = next(csv.DictReader(open(tmp_path / "out2" / "zeroshot.csv")))
    assert all(float(again[k]) == pytest.approx(float(rows["s1"][k]), abs=1e-5) for k in again if k.startswith("score_"))


def test_prompt_and_checkpoint_problems_are_one_line_usage_errors(runs: dict, tmp_path: Path) -> None:
    bag = make_bag(tmp_path / "b.h5", np.ones((2, 64), np.float32))
    (tmp_path / "p.json").write_text(json.dumps({"classnames": {"a": ["x"], "b": ["y"]}, "templates": ["no placeholder"]}))
    r = cli("zeroshot", bag, tmp_path / "o", "--checkpoint", runs["stage2"] / "proj.pth", "--prompts", tmp_path / "p.json")
    assert r.returncode == 2 and "has no CLASSNAME" in r.stderr
    (tmp_path / "p.json").write_text(json.dumps({"classnames": {"a": ["x"], "b": ["y"]}, "templates": ["CLASSNAME"]}))
    r = cli("zeroshot", bag, tmp_path / "o", "--checkpoint", runs["stage2"] / "proj.pth", "--prompts", tmp_path / "p.json")
    assert r.returncode == 1 and "no text_encoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ the tiny toy world, end to end
@pytest.mark.slow
def test_tiny_world_classifies_held_apart_slides_above_chance(tmp_path: Path) -> None:
    """The core of examples/zeroshot/run_tiny.sh, in this process and smaller (6 training and 2 held-apart slides
    per class, ~13 patches each; about 70 s on a busy 2-core machine, 25 s of it imports): real SVS slides whose
    pixels and reports share the class, extraction with the frozen encoder, stage 1, stage 2, the exported
    checkpoint, `zeroshot` on the student's bags of slides no stage saw."""
    from mstar_extract.downstream.inputs import resolve_bags
    from mstar_extract.downstream.zeroshot import ZeroShotSettings, run_zeroshot
    from mstar_extract.pretrain.toyworld import make_toy_world

    w = make_toy_world(tmp_path / "data", n_train=6, n_test=2, n_classes=3, seed=1, size_um=(1300.0, 1000.0))
    here = Path(__file__).resolve().parents[1] / "examples" / "zeroshot"
    extract = ("--model", "timm:test_vit", "--workers", "0", "--no-qc", "--no-report", "-q")
    assert cli("extract", w.root / "slides" / "train", w.root / "bags", "--weights", w.frozen_weights, *extract).returncode == 0
    assert cli("pretrain", "--stage", "1", "--config", here / "stage1.yaml", "--set", f"data.manifest={w.stage1_manifest}",
               "--set", f"text.model={w.text_model}", "--set", "train.batch_size=9", "--out", tmp_path / "s1",
               "-q").returncode == 0
    assert cli("pretrain", "--stage", "2", "--config", here / "stage2.yaml", "--set", f"data.manifest={w.stage2_manifest}",
               "--set", f"teacher.file={tmp_path / 's1' / 'teacher.pt'}", "--init", w.frozen_weights,
               "--out", tmp_path / "s2", "-q").returncode == 0
    assert (tmp_path / "s2" / "zeroshot.pth").is_file()  # written by stage 2 itself
    student = tmp_path / "s2" / "student.pth"
    assert cli("extract", w.root / "slides" / "test", tmp_path / "test", "--weights", student, *extract).returncode == 0
    settings = ZeroShotSettings(str(tmp_path / "s2" / "zeroshot.pth"), str(w.prompts), str(w.labels), device="cpu")
    assert run_zeroshot(resolve_bags([str(tmp_path / "test")]), tmp_path / "zs", settings, Reporter(verbosity=-1)) == 0
    m = json.loads((tmp_path / "zs" / "zeroshot_metrics.json").read_text())
    assert m["n_labelled"] == 6 and m["chance"] == pytest.approx(1 / 3)
    assert m["by_j"]["10"]["accuracy"] > m["chance"], m

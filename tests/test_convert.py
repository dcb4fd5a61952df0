"""convert/ and tdd_jax.models.lora_formats against diffusers as the oracle, on the tiny random SDXL pipeline.

Export: a LoRA written into a real trainer checkpoint goes out in diffusers and kohya format; diffusers'
``load_lora_weights`` of either file gives the UNet output of our student; the fused UNet folder equals it too.
Import: random LoRAs with per-module ranks and alphas (diffusers metadata, kohya SGM names) give the weights
diffusers gives them, and a loaded file reproduces the student in our UNet. Errors name the offending keys and
leave nothing behind. A single-file checkpoint with original SDXL key names converts back to the same folder.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny_pipeline import assert_parity, tiny_sd15_unet_config

from convert import export_lora, fuse_unet, import_checkpoint
from tdd_jax.models import lora_formats as lf
from tdd_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tdd_jax.models.lora import TDD_TARGETS, matches_target, split_lora
from tdd_jax.models.unet import UNet2DConditionModel
from tdd_jax.models.vae import AutoencoderKL

META = {"method": "tdd", "rank": 4, "alpha": 3.0, "targets": list(TDD_TARGETS), "k_min": 4, "k_max": 8,
        "eta": 0.3, "rho": 0.2, "w_min": 3.0, "w_max": 4.0, "guidance_mode": "decoupled", "solver_steps": 50,
        "step": 7}


@nnx.jit
def unet_forward(model, sample, timesteps, context, added):
    return model(sample, timesteps, context, added)


def read_weights(folder) -> dict[str, np.ndarray]:
    with safe_open(str(next(folder.glob("*.safetensors"))), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def layer_shapes_of(weights) -> dict[str, tuple]:
    return {k[:-7]: v.shape for k, v in weights.items() if k.endswith(".weight") and v.ndim in (2, 4)}


def random_lora(shapes, *, seed: int, rank: int = 4, alpha: float = 3.0, vary_rank: bool = False,
                vary_alpha: bool = False):
    """Non-trivial A and B on the TDD targets, optionally with ranks 2..5 / alphas differing per module."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (path, w) in enumerate(sorted(shapes.items())):
        if not matches_target(path, TDD_TARGETS):
            continue
        r = 2 + i % 4 if vary_rank else rank
        a = alpha * (1 + i % 3) if vary_alpha else alpha
        down = rng.normal(0, 0.3, (r, *w[1:])).astype(np.float32)
        up = rng.normal(0, 0.3, (w[0], r, *((1, 1) if len(w) == 4 else ()))).astype(np.float32)
        out[path] = lf.ModuleLoRA(down, up, a / r)
    return out


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_dir):
    cfg = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    rng = np.random.default_rng(0)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(sample=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                timesteps=np.array([999.0, 250.0], np.float32),
                context=rng.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32),
                text_embeds=rng.standard_normal((2, pooled)).astype(np.float32),
                time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]], np.float32))


def torch_out(unet, x) -> np.ndarray:
    added = {k: torch.from_numpy(x[k]) for k in ("text_embeds", "time_ids")}
    with torch.no_grad():
        return unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timesteps"]), torch.from_numpy(x["context"]),
                    added_cond_kwargs=added).sample.numpy()


def jax_out(model, x) -> np.ndarray:
    added = {k: jnp.asarray(x[k]) for k in ("text_embeds", "time_ids")}
    y = unet_forward(model, jnp.asarray(x["sample"].transpose(0, 2, 3, 1)), jnp.asarray(x["timesteps"]),
                     jnp.asarray(x["context"]), added)
    return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def base_out(tiny_pipeline_dir, inputs):
    return torch_out(TorchUNet.from_pretrained(tiny_pipeline_dir / "unet"), inputs)


def diffusers_with_lora(pipeline_dir, lora_file):
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(str(lora_file))
    return pipe


@pytest.fixture(scope="module")
def base_unet(tiny_pipeline_dir):
    return UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")


@pytest.fixture(scope="module")
def base_weights(tiny_pipeline_dir):
    return read_weights(tiny_pipeline_dir / "unet")


@pytest.fixture(scope="module")
def student(base_unet, base_weights, inputs):
    """Our UNet with a random rank-4, alpha-3 LoRA (scale 0.75 ≠ 1), and its output."""
    model = nnx.clone(base_unet)
    lf.attach(model, random_lora(layer_shapes_of(base_weights), seed=1))
    return model, jax_out(model, inputs)


@pytest.fixture(scope="module")
def checkpoint(student, tmp_path_factory):
    """A real trainer checkpoint (orbax, TrainState) holding the student's LoRA online and a distinct EMA."""
    from tdd_jax.training.checkpointing import Checkpointer
    from tdd_jax.training.state import TrainState

    _, lora_state, _ = split_lora(student[0])
    ema = jax.tree.map(lambda v: 0.5 * v, lora_state)
    state = TrainState(step=jnp.asarray(7, jnp.int32), lora=lora_state, ema_lora=ema, opt_state={},
                       rng=jnp.zeros((2,), jnp.uint32))
    workdir = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(workdir / "checkpoints", every=1, keep=1)
    ckpt.save(7, state, {}, META)
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_lora.main(["--checkpoint", str(checkpoint), "--diffusers", str(out / "tdd.safetensors"),
                      "--kohya", str(out / "tdd_kohya.safetensors")])
    return out / "tdd.safetensors", out / "tdd_kohya.safetensors"


@pytest.mark.parametrize("fmt", [0, 1], ids=["diffusers", "kohya"])
def test_exported_lora_in_diffusers_equals_student(fmt, exported, student, tiny_pipeline_dir, inputs, base_out):
    expected = torch_out(diffusers_with_lora(tiny_pipeline_dir, exported[fmt]).unet, inputs)
    assert np.abs(expected - base_out).max() > 0.1 * np.abs(base_out).max(), "the LoRA must change the output"
    assert_parity(f"exported {['diffusers', 'kohya'][fmt]} LoRA", student[1], expected)


def test_export_metadata_and_ema(exported, checkpoint, student, tmp_path):
    for path in exported:
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
        assert meta["method"] == "tdd" and json.loads(meta["rank"]) == 4 and json.loads(meta["alpha"]) == 3.0
        assert json.loads(meta["target_modules"]) == list(TDD_TARGETS)
        assert [json.loads(meta[k]) for k in ("k_min", "k_max", "eta", "rho", "step")] == [4, 8, 0.3, 0.2, 7]
    export_lora.main(["--checkpoint", str(checkpoint), "--ema", "--kohya", str(tmp_path / "ema.safetensors")])
    ema, _ = lf.read_lora_file(tmp_path / "ema.safetensors", {"unet": lf.layer_shapes(student[0])})
    online = lf.lora_from_model(student[0])
    assert set(ema["unet"]) == set(online)
    for path, m in online.items():
        np.testing.assert_allclose(ema["unet"][path].up, 0.5 * m.up, rtol=1e-6)
        assert ema["unet"][path].scale == m.scale


def test_checkpoint_lora_reports_how_it_was_distilled(checkpoint, base_unet):
    """Sampling a trainer workdir tells the w' and teacher grid it was trained with (student_vs_base reads them)."""
    from tdd_jax.pipeline import load_lora

    info = load_lora(checkpoint, {"unet": nnx.clone(base_unet)})
    assert (info["step"], info["method"], info["w_max"], info["solver_steps"]) == (7, "tdd", 4.0, 50)


def test_exported_file_tells_what_the_checkpoint_tells(checkpoint, exported, base_unet):
    """The trainer metadata sampling needs (guidance range and mode, solver grid) reads back the same from the
    checkpoint (metadata only, no arrays) and from both exported files' headers, and reaches ``lora_info``."""
    from tdd_jax import lora_source
    from tdd_jax.pipeline import load_lora
    from tdd_jax.training.checkpointing import checkpoint_metadata

    assert checkpoint_metadata(checkpoint) == META == lora_source.read_metadata(checkpoint)
    expected = {**lora_source.trained_with(META), "ema": False}
    for path in exported:
        header = lora_source.read_metadata(path)
        assert {k: header[k] for k in META} == META
        assert lora_source.trained_with(header) == expected
        info = load_lora(path, {"unet": nnx.clone(base_unet)})
        assert {k: info[k] for k in lora_source.TRAINED_WITH} == expected


def test_sampling_a_checkpoint_takes_its_grid_and_w_prime(checkpoint, tiny_pipeline_dir, tmp_path):
    from tdd_jax.sample import SampleJob, prepare

    (tmp_path / "p.txt").write_text("a cat\n")
    plan = prepare(SampleJob(pipeline=str(tiny_pipeline_dir), prompts=str(tmp_path / "p.txt"), out=str(tmp_path),
                             lora=str(checkpoint), from_lora=frozenset({"grid_steps", "w_prime"})))
    assert (plan.settings.grid_steps, plan.settings.w_prime) == (50, 3.5)
    assert plan.records[0]["lora_trained"]["step"] == 7


def test_fused_unet_equals_student(checkpoint, student, tiny_pipeline_dir, base_weights, inputs, tmp_path):
    out = tmp_path / "fused" / "unet"
    fuse_unet.main(["--base", str(tiny_pipeline_dir), "--lora", str(checkpoint), "--out", str(out)])
    assert_parity("fused UNet (diffusers)", student[1], torch_out(TorchUNet.from_pretrained(out), inputs))
    ours = lf.layer_shapes(UNet2DConditionModel.from_pretrained(out))  # loads in our loader
    fused = read_weights(out)
    assert set(fused) == set(base_weights) and set(ours) == set(layer_shapes_of(fused))
    fuse_unet.main(["--base", str(tiny_pipeline_dir / "unet"), "--lora", str(checkpoint), "--out", str(out),
                    "--dtype", "bfloat16", "--scale", "0.5", "--overwrite"])
    half = read_weights(out)
    lora = lf.lora_from_model(student[0])
    path = sorted(lora)[0]
    assert half[path + ".weight"].dtype.name == "bfloat16"
    np.testing.assert_allclose(half[path + ".weight"].astype(np.float32),
                               base_weights[path + ".weight"] + 0.5 * lora[path].delta(), rtol=1e-2, atol=1e-2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet"]


def test_loaded_lora_file_reproduces_student(exported, base_unet, student, tiny_pipeline_dir, inputs):
    model = nnx.clone(base_unet)
    assert lf.load_lora_file(exported[1], {"unet": model}) == {"unet": len(lf.lora_from_model(student[0]))}
    assert_parity("kohya file loaded into our UNet", jax_out(model, inputs), student[1], rtol=1e-6)


def fused_by_diffusers(pipeline_dir, lora_file) -> dict[str, np.ndarray]:
    pipe = diffusers_with_lora(pipeline_dir, lora_file)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.numpy() for k, v in pipe.unet.state_dict().items()}


def with_lora(base_weights, lora) -> dict[str, np.ndarray]:
    return {k: v + lora[k[:-7]].delta() if k[:-7] in lora else v for k, v in base_weights.items()}


def assert_same_weights(name, actual, expected):
    assert set(actual) == set(expected)
    err = max(np.abs(actual[k] - expected[k]).max() / max(1.0, np.abs(expected[k]).max()) for k in actual)
    assert err <= 1e-5, f"{name}: relative weight error {err:.3g}"
    print(f"{name}: max relative weight error {err:.3g}")


def test_import_diffusers_with_adapter_metadata(tiny_pipeline_dir, base_weights, tmp_path):
    """Raw A/B with diffusers' lora_adapter_metadata: per-module ranks and an alpha_pattern, as PEFT saves them."""
    shapes = layer_shapes_of(base_weights)
    lora = random_lora(shapes, seed=2, vary_rank=True, vary_alpha=True)
    paths = sorted(lora)
    tensors = {}
    for p, m in lora.items():
        tensors[f"unet.{p}.lora_A.weight"], tensors[f"unet.{p}.lora_B.weight"] = m.down, m.up
    config = {"r": 2, "lora_alpha": 3.0, "target_modules": paths,
              "rank_pattern": {p: m.rank for p, m in lora.items() if m.rank != 2},
              "alpha_pattern": {p: m.scale * m.rank for p, m in lora.items() if m.scale * m.rank != 3.0}}
    header = {"format": "pt", lf.DIFFUSERS_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()})}
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata=header)
    loaded, _ = lf.read_lora_file(tmp_path / "peft.safetensors", {"unet": shapes})
    for p, m in lora.items():
        assert loaded["unet"][p].scale == pytest.approx(m.scale, rel=1e-12)
    assert_same_weights("diffusers file with adapter metadata", with_lora(base_weights, loaded["unet"]),
                        fused_by_diffusers(tiny_pipeline_dir, tmp_path / "peft.safetensors"))


def test_import_kohya_sgm_names(tiny_pipeline_dir, base_weights, tmp_path):
    """kohya sd-scripts' SDXL naming (input_blocks/middle_block/output_blocks) with per-module ranks.

    One alpha for all modules: diffusers' kohya converter keys per-module alphas of attention layers as
    '...processor.to_q_lora.down.weight', which PEFT ignores, so diffusers is no oracle for varying alphas there
    (kohya's own semantics, scale = alpha / rank per module, is checked on the loaded scales instead).
    """
    shapes = layer_shapes_of(base_weights)
    lora = random_lora(shapes, seed=3, vary_rank=True)
    sgm = lf.sgm_unet_names(lora)
    tensors = {}
    for key, value in lf.to_kohya(lora).items():
        name, _, suffix = key.partition(".")
        path = next(p for p in lora if "lora_unet_" + p.replace(".", "_") == name)
        tensors[f"lora_unet_{sgm[path].replace('.', '_')}.{suffix}"] = value
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in tensors)
    save_file(tensors, str(tmp_path / "sgm.safetensors"))
    loaded, _ = lf.read_lora_file(tmp_path / "sgm.safetensors", {"unet": shapes})
    assert {p: m.scale for p, m in loaded["unet"].items()} == pytest.approx({p: m.scale for p, m in lora.items()})
    assert_same_weights("kohya file with SGM names", with_lora(base_weights, loaded["unet"]),
                        fused_by_diffusers(tiny_pipeline_dir, tmp_path / "sgm.safetensors"))


def test_import_text_encoder_loras(tiny_pipeline_dir, tmp_path):
    """SDXL kohya text-encoder names (lora_te1_text_model_..., lora_te2_...) reach our CLIP models as in diffusers."""
    folders = {c: tiny_pipeline_dir / c for c in ("text_encoder", "text_encoder_2")}
    models = {"text_encoder": CLIPTextModel.from_pretrained(folders["text_encoder"]),
              "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folders["text_encoder_2"])}
    rng = np.random.default_rng(6)
    tensors, loras = {}, {}
    for component, prefix in (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        for path, (out, inp) in lf.layer_shapes(models[component]).items():
            if path.endswith(("_proj", "fc1", "fc2")) and path != "text_projection":
                name = f"{prefix}_{path if path.startswith('text_model.') else 'text_model.' + path}".replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = rng.normal(0, 0.3, (2, inp)).astype(np.float32)
                tensors[f"{name}.lora_up.weight"] = rng.normal(0, 0.3, (out, 2)).astype(np.float32)
                tensors[f"{name}.alpha"] = np.array(3.0, np.float32)
                loras.setdefault(component, set()).add(path)
    save_file(tensors, str(tmp_path / "te.safetensors"))
    assert lf.load_lora_file(tmp_path / "te.safetensors", models) == {c: len(p) for c, p in loras.items()}
    pipe = diffusers_with_lora(tiny_pipeline_dir, tmp_path / "te.safetensors")
    pipe.fuse_lora(components=list(models))
    pipe.unload_lora_weights()
    for component, model in models.items():
        attached = lf.lora_from_model(model)
        assert set(attached) == loras[component]
        expected = {k: v.numpy() for k, v in getattr(pipe, component).state_dict().items()}
        assert_same_weights(component, with_lora(read_weights(folders[component]), attached), expected)


def sd15_lora_file(path):
    """A PEFT-format LoRA trained on an SD1.5-style UNet (attention in the first level, 1x1-conv projections)."""
    torch.manual_seed(0)
    shapes = {k[:-7]: tuple(v.shape) for k, v in TorchUNet(**tiny_sd15_unet_config()).state_dict().items()
              if k.endswith(".weight") and v.ndim in (2, 4)}
    save_file(lf.to_diffusers(random_lora(shapes, seed=4)), str(path))


def bad_files(folder, base_weights):
    folder.mkdir()
    lora = random_lora(layer_shapes_of(base_weights), seed=5)
    good = lf.to_kohya(lora)
    unknown = dict(good, **{"lora_unet_down_blocks_0_nope.lora_down.weight": np.zeros((4, 32), np.float32),
                            "lora_unet_down_blocks_0_nope.lora_up.weight": np.zeros((32, 4), np.float32)})
    foreign = dict(lf.to_diffusers(lora), **{"unet.conv_in.dora_scale": np.zeros((1,), np.float32)})
    first = sorted(lora)[0]
    shape = dict(good)
    shape[f"lora_unet_{first.replace('.', '_')}.lora_down.weight"] = np.zeros((4, 3), np.float32)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    with_te = dict(good, **{f"{te}.lora_down.weight": np.zeros((4, 32), np.float32),
                            f"{te}.lora_up.weight": np.zeros((32, 4), np.float32)})
    files = {"unknown module": (unknown, "lora_unet_down_blocks_0_nope"), "text encoder not given": (with_te, te),
             "unknown format": (foreign, "unet.conv_in.dora_scale"),
             "shape mismatch": (shape, first)}
    for name, (tensors, _) in files.items():
        save_file(tensors, str(folder / f"{name.replace(' ', '_')}.safetensors"))
    sd15_lora_file(folder / "sd15.safetensors")
    return {**{n: (folder / f"{n.replace(' ', '_')}.safetensors", k) for n, (_, k) in files.items()},
            "SD1.5 on SDXL": (folder / "sd15.safetensors", "unet.down_blocks.0.attentions.0")}


def test_errors_name_keys_and_write_nothing(tmp_path, base_unet, base_weights, tiny_pipeline_dir):
    for name, (path, culprit) in bad_files(tmp_path / "in", base_weights).items():
        model = nnx.clone(base_unet)
        with pytest.raises(lf.LoRAFormatError, match=re.escape(culprit)) as err:
            lf.load_lora_file(path, {"unet": model})
        print(f"{name}: {err.value}")
        assert not lf.lora_from_model(model), "nothing may be attached on failure"
        out = tmp_path / "out" / name.replace(" ", "_")
        with pytest.raises(lf.LoRAFormatError, match=re.escape(culprit)):
            fuse_unet.fuse(tiny_pipeline_dir, path, out)
        assert not out.parent.exists() or not any(out.parent.iterdir()), "no output or temporary left behind"


def test_existing_outputs_are_kept(checkpoint, tmp_path, capsys):
    target = tmp_path / "tdd.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(SystemExit) as exit_:
        export_lora.main(["--checkpoint", str(checkpoint), "--kohya", str(tmp_path / "new.safetensors"),
                          "--diffusers", str(target)])
    assert exit_.value.code == 2 and f"error: {target} exists; pass --overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["tdd.safetensors"]


@pytest.mark.parametrize("module", [export_lora, fuse_unet, import_checkpoint])
def test_cli_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "--" in capsys.readouterr().out


# --- single-file import ---------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> LDM ``first_stage_model`` key (the layout of SDXL's single file)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in _VAE_ATTN.items():
        key = key.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
    return key


def original_open_clip(weights: dict) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP keys under ``conditioner.embedders.1.model.``."""
    pre, out, qkv = "conditioner.embedders.1.model.", {}, {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for key, value in weights.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)$", key)
        if not m:
            continue
        proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", m[2])
        if proj:
            qkv.setdefault((m[1], proj[2]), {})[proj[1]] = value
            continue
        rest = m[2]
        for new, old in renames.items():
            rest = rest.replace(new, old)
        out[f"{pre}transformer.resblocks.{m[1]}.{rest}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"{pre}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate([parts[c] for c in "qkv"])
    out[pre + "token_embedding.weight"] = weights["text_model.embeddings.token_embedding.weight"]
    out[pre + "positional_embedding"] = weights["text_model.embeddings.position_embedding.weight"]
    out[pre + "ln_final.weight"] = weights["text_model.final_layer_norm.weight"]
    out[pre + "ln_final.bias"] = weights["text_model.final_layer_norm.bias"]
    out[pre + "text_projection"] = np.ascontiguousarray(weights["text_projection.weight"].T)
    return out


def single_file(pipeline_dir) -> dict[str, np.ndarray]:
    """A tiny pipeline's weights under the key names of ``sd_xl_base_1.0.safetensors``."""
    unet = read_weights(pipeline_dir / "unet")
    sgm = lf.sgm_unet_names(unet)
    assert set(sgm) == set(unet)
    out = {f"model.diffusion_model.{sgm[k]}": v for k, v in unet.items()}
    levels = len(json.loads((pipeline_dir / "vae" / "config.json").read_text())["block_out_channels"])
    for key, value in read_weights(pipeline_dir / "vae").items():
        key = original_vae_key(key, levels)
        if ".mid.attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out[f"first_stage_model.{key}"] = value
    for key, value in read_weights(pipeline_dir / "text_encoder").items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"conditioner.embedders.0.transformer.{key}"] = value
    out.update(original_open_clip(read_weights(pipeline_dir / "text_encoder_2")))
    return out


@pytest.fixture(scope="module")
def distinct_width_pipeline(tmp_path_factory):
    """The tiny pipeline with text_encoder_2 wider than text_encoder: diffusers' single-file loader tells the
    two CLIP towers apart by width, as SDXL's 768 vs 1280."""
    import tiny_pipeline

    original = tiny_pipeline.tiny_clip_configs

    def wider():
        first, second = original()
        return first, dict(second, hidden_size=48, intermediate_size=96)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_pipeline, "tiny_clip_configs", wider)
        return tiny_pipeline.save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("wide") / "pipe")


def test_single_file_import_round_trip(distinct_width_pipeline, tmp_path):
    src = distinct_width_pipeline
    save_file(single_file(src), str(tmp_path / "sd_xl_tiny.safetensors"))
    out = tmp_path / "imported"
    import_checkpoint.main(["--checkpoint", str(tmp_path / "sd_xl_tiny.safetensors"), "--config", str(src),
                            "--out", str(out)])
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = read_weights(src / component), read_weights(out / component)
        assert set(a) == set(b), component
        for key in a:
            np.testing.assert_array_equal(b[key].reshape(a[key].shape), a[key], err_msg=f"{component}.{key}")
    UNet2DConditionModel.from_pretrained(out / "unet")
    AutoencoderKL.from_pretrained(out / "vae")
    CLIPTextModel.from_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "sd_xl_tiny.safetensors"]

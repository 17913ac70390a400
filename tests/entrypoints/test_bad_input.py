"""Bad input to ``omni-diffuse generate``: exit 2, one clear message, no traceback, nothing
loaded -- a table of the ways a prompt file or a flag can be wrong.

Run in-process (the CLI's own ``main``): every case fails in rank 0's planning, before any
model is loaded, so each takes milliseconds. ``test_bad_input_releases_every_rank`` checks
the same path under real launchers.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, torch)

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from launch import LAUNCH

from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.jobs.manifest import ManifestWriter
from spmd_diffusion.jobs.prompts import read_items

# (name, file name, file bytes or None, extra args, expected message)
CASES = [
    ("binary garbage txt", "g.txt", bytes(range(256)) * 4, [], "g.txt:1: holds a NUL byte"),
    (
        "binary garbage txt past line 1",
        "g.txt",
        bytes(range(1, 256)) * 4,
        [],
        "g.txt:2: not UTF-8 text (byte 0x80)",
    ),
    ("binary garbage jsonl", "g.jsonl", b"\xff\xfe\x00garbage", [], "g.jsonl:1: not UTF-8 text"),
    (
        "stray latin-1 byte on line 3",
        "p.txt",
        b"one\ntwo\nd\xe9j\xe0 vu\n",
        [],
        "p.txt:3: not UTF-8 text (byte 0xe9)",
    ),
    ("NUL byte", "p.txt", b"one\ntw\x00o\n", [], "p.txt:2: holds a NUL byte"),
    ("deep nesting", "p.jsonl", b"[" * 100_000 + b"\n", [], "p.jsonl:1: nested too deeply"),
    (
        "5000-digit integer",
        "p.jsonl",
        b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}\n",
        [],
        "p.jsonl:1: not valid JSON (a number is too large)",
    ),
    (
        "NaN guidance in jsonl",
        "p.jsonl",
        b'{"prompt": "x", "guidance": NaN}\n',
        [],
        "p.jsonl:1: not valid JSON (NaN is not a number JSON allows)",
    ),
    (
        "Infinity guidance in jsonl",
        "p.jsonl",
        b'{"prompt": "x", "guidance": Infinity}\n',
        [],
        "Infinity is not a number JSON allows",
    ),
    ("broken JSON", "p.jsonl", b'{"prompt": "ok"}\n{"prompt": \n', [], "p.jsonl:2: not valid JSON"),
    ("a JSON list line", "p.jsonl", b'["a"]\n', [], "p.jsonl:1: each line must be a JSON object"),
    ("missing prompt", "p.jsonl", b'{"id": "a"}\n', [], "'prompt' is required"),
    ("empty prompt", "p.jsonl", b'{"prompt": "   "}\n', [], "'prompt' is required"),
    (
        "prompt not a string",
        "p.jsonl",
        b'{"prompt": 5}\n',
        [],
        "'prompt' is required and must be a non-empty string",
    ),
    (
        "bad id",
        "p.jsonl",
        b'{"prompt": "x", "id": "../../etc"}\n',
        [],
        "id '../../etc' must be 1-128 characters",
    ),
    ("empty id", "p.jsonl", b'{"prompt": "x", "id": ""}\n', [], "p.jsonl:1: id is empty"),
    (
        "blank id",
        "p.jsonl",
        b'{"prompt": "x"}\n{"prompt": "y", "id": "  "}\n',
        [],
        "p.jsonl:2: id is empty",
    ),
    (
        "duplicate id",
        "p.jsonl",
        b'{"prompt": "x", "id": "a"}\n{"prompt": "y", "id": "a"}\n',
        [],
        "id 'a' repeats line 1",
    ),
    (
        "height not a multiple of 8",
        "p.jsonl",
        b'{"prompt": "x", "height": 60}\n',
        [],
        "height must be a positive multiple of 8",
    ),
    (
        "height past the limit",
        "p.jsonl",
        b'{"prompt": "x", "height": 100000}\n',
        [],
        "height 100000 is above the limit of 4096",
    ),
    (
        "steps past the limit",
        "p.jsonl",
        b'{"prompt": "x", "steps": 100000}\n',
        [],
        "num_inference_steps 100000 is above the limit of 1000",
    ),
    (
        "steps not an integer",
        "p.jsonl",
        b'{"prompt": "x", "steps": "many"}\n',
        [],
        "num_inference_steps must be an integer",
    ),
    (
        "negative guidance",
        "p.jsonl",
        b'{"prompt": "x", "guidance": -1}\n',
        [],
        "guidance_scale must be a finite number >= 0",
    ),
    (
        "seed too large",
        "p.jsonl",
        b'{"prompt": "x", "seed": 18446744073709551616}\n',
        [],
        "seed must be in [0, 2**63 - 1]",
    ),
    (
        "negative seed",
        "p.jsonl",
        b'{"prompt": "x", "seed": -5}\n',
        [],
        "seed must be in [0, 2**63 - 1]",
    ),
    (
        "prompt past the length cap",
        "p.txt",
        b"ok\n" + b"x" * 8193 + b"\n",
        [],
        "p.txt:2: prompt is 8193 characters; the most is 8192",
    ),
    (
        "jsonl prompt past the length cap",
        "p.jsonl",
        b'{"prompt": "' + "\u00e9".encode() * 8193 + b'"}\n',
        [],
        "p.jsonl:1: prompt is 8193 characters; the most is 8192",
    ),
    (
        "negative prompt past the length cap",
        "p.jsonl",
        b'{"prompt": "x", "negative_prompt": "' + b"n" * 9000 + b'"}\n',
        [],
        "p.jsonl:1: negative_prompt is 9000 characters; the most is 8192",
    ),
    (
        "--negative-prompt past the length cap",
        "p.txt",
        b"x\n",
        ["--negative-prompt", "n" * 8193],
        "p.txt:1: negative_prompt is 8193 characters",
    ),
    (
        "csv without prompt column",
        "p.csv",
        b"text,seed\nhello,1\n",
        [],
        "needs a header row with a 'prompt' column",
    ),
    (
        "csv extra cells",
        "p.csv",
        b"prompt,seed\nhello,1,surplus\n",
        [],
        "p.csv:2: 3 cells, but the header has 2 columns",
    ),
    ("csv bad seed", "p.csv", b"prompt,seed\nhello,abc\n", [], "seed must be an integer"),
    (
        "csv huge seed",
        "p.csv",
        b"prompt,seed\nhello,99999999999999999999\n",
        [],
        "seed must be in [0, 2**63 - 1]",
    ),
    ("empty txt", "p.txt", b"\n\n", [], "no prompts in"),
    ("empty csv", "p.csv", b"prompt\n", [], "no prompts in"),
    ("unknown extension", "p.yaml", b"prompt: x\n", [], "use .txt, .jsonl, .csv, .parquet"),
    (
        "height flag not multiple of 8",
        "p.txt",
        b"x\n",
        ["--height", "60"],
        "height must be a positive multiple of 8",
    ),
    (
        "height flag past the limit",
        "p.txt",
        b"x\n",
        ["--height", "100000"],
        "height 100000 is above the limit",
    ),
    (
        "raised limit refuses less",
        "p.txt",
        b"x\n",
        ["--height", "512", "--max-image-size", "256"],
        "height 512 is above the limit of 256",
    ),
    ("steps flag zero", "p.txt", b"x\n", ["--steps", "0"], "Invalid value for '--steps'"),
    (
        "steps flag past the limit",
        "p.txt",
        b"x\n",
        ["--steps", "5000"],
        "num_inference_steps 5000 is above the limit",
    ),
    ("guidance nan", "p.txt", b"x\n", ["--guidance", "nan"], "nan is not a finite number"),
    ("guidance inf", "p.txt", b"x\n", ["--guidance", "inf"], "inf is not a finite number"),
    ("guidance negative", "p.txt", b"x\n", ["--guidance", "-1"], "Invalid value for '--guidance'"),
    (
        "images per prompt past the limit",
        "p.txt",
        b"x\n",
        ["--images-per-prompt", "1000"],
        "num_images_per_prompt 1000 is above the limit of 64",
    ),
    (
        "seed 2**64",
        "p.txt",
        b"x\n",
        ["--seed", str(2**64)],
        "seed must be an integer in [0, 2**63 - 1]",
    ),
    (
        "negative seed flag",
        "p.txt",
        b"x\n",
        ["--seed", "-1"],
        "seed must be an integer in [0, 2**63 - 1]",
    ),
    ("batch size zero", "p.txt", b"x\n", ["--batch-size", "0"], "Invalid value for '--batch-size'"),
    ("threads zero", "p.txt", b"x\n", ["--threads", "0"], "Invalid value for '--threads'"),
    (
        "tp not dividing",
        "p.txt",
        b"x\n",
        ["--tp", "3", "--num-gpus", "2"],
        "--tp 3 needs a multiple of 3 ranks",
    ),
    (
        "ulysses not dividing",
        "p.txt",
        b"x\n",
        ["--model", "tiny-flux", "--ulysses", "2", "--ring", "2", "--num-gpus", "2"],
        "--ulysses 2 x --ring 2 needs a multiple of 4 ranks",
    ),
    (
        "ulysses on a unet",
        "p.txt",
        b"x\n",
        ["--ulysses", "2", "--num-gpus", "2"],
        "--ulysses 2: sequence parallelism splits a transformer's tokens; "
        "UNet2DConditionModel is a UNet",
    ),
    (
        "ring on a unet",
        "p.txt",
        b"x\n",
        ["--model", "tiny-sdxl", "--ring", "2", "--num-gpus", "2"],
        "--ring 2: sequence parallelism splits a transformer's tokens",
    ),
    (
        "ulysses not dividing the heads",
        "p.txt",
        b"x\n",
        ["--model", "tiny-sd3", "--ulysses", "3", "--num-gpus", "3"],
        "--ulysses 3: --ulysses 3 splits attention heads, and SD3Transformer2DModel has 4 heads",
    ),
    (
        "tp x ulysses not dividing the heads",
        "p.txt",
        b"x\n",
        ["--model", "tiny-dit", "--ulysses", "2", "--tp", "4", "--num-gpus", "8"],
        "--tp 4 x --ulysses 2 split attention heads, and PixArtTransformer2DModel has 4 heads",
    ),
    (
        "cfg parallel on guidance-distilled flux",
        "p.txt",
        b"x\n",
        ["--model", "tiny-flux", "--cfg-parallel", "--num-gpus", "2"],
        "--cfg-parallel: no item runs classifier-free guidance, so one rank of every pair would "
        "idle (FluxPipeline",
    ),
    (
        "cfg parallel without a negative prompt on qwen",
        "p.txt",
        b"x\n",
        ["--model", "tiny-qwen-image", "--cfg-parallel", "--num-gpus", "2"],
        "QwenImagePipeline guides only with",
    ),
    (
        "cfg parallel with guidance off",
        "p.txt",
        b"x\n",
        ["--model", "tiny-dit", "--cfg-parallel", "--guidance", "1", "--num-gpus", "2"],
        "PixArtAlphaPipeline guides when",
    ),
    (
        "true cfg on a pipeline without it",
        "p.jsonl",
        b'{"prompt": "x", "true_cfg_scale": 3}\n',
        [],
        "p.jsonl:1: StableDiffusionPipeline takes no true_cfg_scale",
    ),
    (
        "true cfg negative",
        "p.jsonl",
        b'{"prompt": "x", "true_cfg_scale": -3}\n',
        ["--model", "tiny-qwen-image"],
        "true_cfg_scale must be a finite number >= 0",
    ),
    (
        "vae parallel without a replica",
        "p.txt",
        b"x\n",
        ["--vae-parallel", "--num-gpus", "2"],
        "vae_parallel splits a decode over the ranks of a replica, and a replica here is one rank",
    ),
    (
        "vae parallel on ltx's video vae",
        "p.txt",
        b"x\n",
        ["--model", "tiny-ltx", "--vae-parallel", "--ulysses", "2", "--num-gpus", "2"],
        "--vae-parallel splits the decode of the KL autoencoder (SD, SDXL, PixArt, SD3, Flux) "
        "and of the causal 3-D VAE of Wan and Qwen-Image (AutoencoderKL, AutoencoderKLWan, "
        "AutoencoderKLQwenImage); this pipeline's VAE is AutoencoderKLLTXVideo",
    ),
    (
        "vae parallel on sana's dc-ae",
        "p.txt",
        b"x\n",
        ["--model", "tiny-sana", "--vae-parallel", "--tp", "2", "--num-gpus", "2"],
        "this pipeline's VAE is AutoencoderDC",
    ),
    (
        "vae parallel with tiling",
        "p.txt",
        b"x\n",
        ["--vae-parallel", "--vae-tiling", "--tp", "2", "--num-gpus", "2"],
        "vae_parallel decodes whole bands of the image: it replaces vae_tiling/vae_slicing",
    ),
    (
        "image tokens not splitting over ulysses",
        "p.jsonl",
        b'{"prompt": "x", "height": 80, "width": 80}\n',
        ["--model", "tiny-flux", "--ulysses", "2", "--num-gpus", "2"],
        "p.jsonl:1: a 80x80 image is 5x5 = 25 tokens, which do not split evenly over 2 "
        "sequence-parallel ranks",
    ),
    (
        "token rows not splitting over ring on sana",
        "p.txt",
        b"x\n",
        ["--model", "tiny-sana", "--ring", "2", "--height", "72", "--num-gpus", "2"],
        "is 9 rows of tokens, which do not split evenly over 2 sequence-parallel ranks; use a "
        "height that is a multiple of 16",
    ),
    (
        "unknown quantization kind",
        "p.txt",
        b"x\n",
        ["--quantize", "int3"],
        "quantize must be one of int8wo",
    ),
    (
        "quantize with tp",
        "p.txt",
        b"x\n",
        ["--quantize", "int8wo", "--tp", "2", "--num-gpus", "2"],
        "quantize with tensor parallelism",
    ),
    (
        "float8 dynamic on a cpu",
        "p.txt",
        b"x\n",
        ["--quantize", "float8dq"],
        "quantize float8dq cannot run on cpu here",
    ),
    (
        "bitsandbytes on a cpu",
        "p.txt",
        b"x\n",
        ["--quantize", "bnb-nf4"],
        "quantize bnb-nf4 needs a GPU",
    ),
    (
        "quantize a component the pipeline lacks",
        "p.txt",
        b"x\n",
        ["--quantize", "int8wo", "--quantize-components", "denoiser,text_encoder_9"],
        "quantize_components: 'text_encoder_9' is not a component of this pipeline",
    ),
    (
        "group offload on a cpu",
        "p.txt",
        b"x\n",
        ["--offload", "group", "--device", "cpu"],
        "offload moves whole models between the CPU and one accelerator",
    ),
    ("unknown executor", "p.txt", b"x\n", ["--executor", "nope"], "unknown executor_class 'nope'"),
    (
        "missing model dir",
        "p.txt",
        b"x\n",
        ["--model", "/no/such/model"],
        "does not exist or is not a directory",
    ),
    (
        "unknown model name",
        "p.txt",
        b"x\n",
        ["--model", "not a model"],
        "unknown model 'not a model'",
    ),
    ("bad dtype", "p.txt", b"x\n", ["--dtype", "int8"], "Invalid value for '--dtype'"),
    (
        "bad device",
        "p.txt",
        b"x\n",
        ["--device", "tpu"],
        "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
    (
        "prompt and prompts",
        "p.txt",
        b"x\n",
        ["--prompt", "y"],
        "give --prompts FILE or --prompt TEXT, not both",
    ),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["generate", *args])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "name, file_name, data, extra, message", CASES, ids=[case[0] for case in CASES]
)
def test_bad_prompt_files_and_flags(tmp_path, capsys, name, file_name, data, extra, message):
    path = tmp_path / file_name
    path.write_bytes(data)
    code, err = run_cli(["--prompts", str(path), "--output", str(tmp_path / "out"), *extra], capsys)
    assert code == 2, err
    assert err.count(message) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


IMAGE_CASES = [
    (
        "image URL",
        '{"prompt": "x", "image": "https://example.com/a.png"}',
        [],
        "p.jsonl:2: image 'https://example.com/a.png' is a URL: jobs run offline",
    ),
    (
        "missing image file",
        '{"prompt": "x", "image": "pics/none.png"}',
        [],
        "p.jsonl:2: image file '{dir}/pics/none.png' does not exist",
    ),
    (
        "image is a directory",
        '{"prompt": "x", "image": "pics"}',
        [],
        "p.jsonl:2: image '{dir}/pics' is not a file",
    ),
    (
        "not an image",
        '{"prompt": "x", "image": "pics/notes.png"}',
        [],
        "p.jsonl:2: image file '{dir}/pics/notes.png' is not an image Pillow can read",
    ),
    (
        "mask not an image",
        '{"prompt": "x", "image": "pics/a.png", "mask_image": "pics/notes.png"}',
        [],
        "p.jsonl:2: mask_image file '{dir}/pics/notes.png' is not an image",
    ),
    (
        "mask without image",
        '{"prompt": "x", "mask_image": "pics/a.png"}',
        [],
        "p.jsonl:2: mask_image needs an image",
    ),
    (
        "mask of another size",
        '{"prompt": "x", "image": "pics/a.png", "mask_image": "pics/small.png"}',
        [],
        "p.jsonl:2: mask_image is 16x16 and image is 32x32: an inpainting mask must have its "
        "image's size",
    ),
    (
        "strength above 1",
        '{"prompt": "x", "image": "pics/a.png", "strength": 1.5}',
        [],
        "p.jsonl:2: strength must be a number in (0, 1], got 1.5",
    ),
    (
        "strength zero",
        '{"prompt": "x", "image": "pics/a.png", "strength": 0}',
        [],
        "p.jsonl:2: strength must be a number in (0, 1]",
    ),
    (
        "strength flag zero",
        '{"prompt": "x", "image": "pics/a.png"}',
        ["--strength", "0"],
        "Invalid value for '--strength'",
    ),
    (
        "image past the size limit",
        '{"prompt": "x", "image": "pics/a.png"}',
        ["--max-image-size", "16"],
        "p.jsonl:1: image is 32x32, above the limit of 16",
    ),
    (
        "mask for an img2img pipeline",
        '{"prompt": "x", "image": "pics/a.png", "mask_image": "pics/a.png"}',
        ["--model-class-name", "StableDiffusionImg2ImgPipeline"],
        "p.jsonl:2: StableDiffusionImg2ImgPipeline takes no mask_image",
    ),
    (
        "inpainting item without a mask",
        '{"prompt": "x", "image": "pics/a.png"}',
        ["--model-class-name", "StableDiffusionInpaintPipeline"],
        "p.jsonl:1: StableDiffusionInpaintPipeline needs mask_image: it edits an input image",
    ),
    (
        "img2img item without an image",
        '{"prompt": "x"}',
        ["--model-class-name", "StableDiffusionImg2ImgPipeline"],
        "p.jsonl:2: StableDiffusionImg2ImgPipeline needs image",
    ),
]


@pytest.mark.parametrize(
    "name, line, extra, message", IMAGE_CASES, ids=[case[0] for case in IMAGE_CASES]
)
def test_bad_image_inputs(tmp_path, capsys, name, line, extra, message):
    """Input images are checked (headers only) by rank 0 before loading; paths are relative to
    the prompt file; each problem names the file and line."""
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pics" / "a.png")
    Image.new("L", (16, 16)).save(tmp_path / "pics" / "small.png")
    (tmp_path / "pics" / "notes.png").write_text("just text")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine", "image": "pics/a.png"}\n' + line + "\n")
    code, err = run_cli(
        [
            "--prompts",
            str(path),
            "--output",
            str(tmp_path / "out"),
            *(
                extra
                if "--model-class-name" in extra
                else ["--model-class-name", "StableDiffusionImg2ImgPipeline", *extra]
            ),
        ],
        capsys,
    )
    assert code == 2, err
    assert err.count(message.format(dir=tmp_path)) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_image_items_need_a_pipeline_that_takes_images(tmp_path, capsys):
    """The default tiny model is text-to-image: refused before loading, with the fix."""
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "y", "image": "a.png"}\n')
    code, err = run_cli(["--prompts", str(path), "--output", str(tmp_path / "out")], capsys)
    assert (
        code == 2
        and "p.jsonl:2: StableDiffusionPipeline takes no image: load an image-to-image" in err
    ), err


def test_missing_prompt_file(tmp_path, capsys):
    code, err = run_cli(
        ["--prompts", str(tmp_path / "none.txt"), "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "does not exist" in err


def test_csv_saved_with_a_byte_order_mark_is_read(tmp_path):

    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffprompt,seed\nhello,3\n".encode())
    (item,) = read_items(str(path))
    assert item.prompt == "hello" and item.settings == {"seed": 3}


@pytest.mark.parametrize(
    "layout, message",
    [
        ("output is a file", "is a file"),
        ("manifest is a directory", "manifest.jsonl exists and is not a file"),
        ("run.json is a directory", "run.json exists and is not a file"),
        ("images is a file", "images exists and is not a directory"),
    ],
)
def test_unusable_output_directory_is_refused_before_loading(tmp_path, capsys, layout, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    output = tmp_path / "out"
    if layout == "output is a file":
        output.write_text("")
    else:
        output.mkdir()
        name = {
            "manifest is a directory": "manifest.jsonl",
            "run.json is a directory": "run.json",
            "images is a file": "images",
        }[layout]
        (output / name).mkdir() if name != "images" else (output / name).write_text("")
    code, err = run_cli(["--prompts", str(prompts), "--output", str(output)], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_unwritable_output_directory_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """As above for a directory the job may not write (faked: root may write anywhere)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode),
    )
    code, err = run_cli(
        ["--prompts", str(prompts), "--output", str(tmp_path / "new" / "out")], capsys
    )
    assert code == 2 and "is not writable" in err, err


@pytest.mark.launcher
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_bad_input_releases_every_rank(tmp_path, launcher):
    """A garbage prompt file ends a 2-rank job with exit 2 and one message, fast: rank 0's
    failure before start-up releases the other rank (which would otherwise wait forever)."""
    garbage = tmp_path / "g.txt"
    garbage.write_bytes(os.urandom(3000))
    command = LAUNCH[launcher]
    done = subprocess.run(
        [*command, "generate", "--prompts", str(garbage), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    expected = 2 if launcher == "mpiexec" else 1  # torchrun reports any failing rank as 1
    assert done.returncode == expected, done.stderr[-3000:]
    assert done.stderr.count("not UTF-8 text") == 1, done.stderr[-3000:]
    our_frames = [
        line for line in done.stderr.splitlines() if 'File "' in line and "spmd_diffusion" in line
    ]
    assert not our_frames, done.stderr[
        -3000:
    ]  # torchrun's agent prints its own report; the ranks none


def test_manifest_lines_are_strict_json(tmp_path):
    """Nothing the job writes may hold NaN or Infinity (they are not JSON)."""

    writer = ManifestWriter(tmp_path, fresh=True)
    with pytest.raises(ValueError, match="JSON compliant"):
        writer.append([{"id": "a", "seconds": float("nan")}])
    writer.append([{"id": "b", "seconds": 1.5}])
    writer.close()
    assert json.loads((tmp_path / "manifest.jsonl").read_text()) == {"id": "b", "seconds": 1.5}


def test_a_prompt_flag_past_the_length_cap_is_refused(tmp_path, capsys):
    code, err = run_cli(
        ["--prompt", "fine", "--prompt", "x" * 8193, "--output", str(tmp_path / "out")], capsys
    )
    assert (
        code == 2 and err.count("--prompt #2: prompt is 8193 characters; the most is 8192") == 1
    ), err


def test_neither_prompts_nor_prompt_names_both(tmp_path, capsys):
    code, err = run_cli(["--output", str(tmp_path / "out")], capsys)
    assert (
        code == 2
        and err.count("nothing to generate: give --prompts FILE") == 1
        and "--prompt TEXT" in err
    ), err
    assert not (tmp_path / "out").exists()


def test_load_time_failures_are_caught_before_loading(tmp_path, capsys, tiny_unet):
    """A corrupt model index, a truncated weights file, a device this machine lacks, a pipeline
    class diffusers does not have and an output under /proc: refused by rank 0, nothing loaded."""

    import torch

    broken_index = tmp_path / "broken-index"
    broken_index.mkdir()
    (broken_index / "model_index.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_unet, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    cases = [
        (["--model", str(broken_index)], "model_index.json is not a readable JSON file"),
        (["--model", str(truncated)], f"model file {weights} is damaged: truncated"),
        (
            ["--model-class-name", "BogusPipeline"],
            "model_class_name 'BogusPipeline' is not a diffusers pipeline class",
        ),
        (["--output", "/proc/spmd-diffusion-out"], "cannot create files in '/proc'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: this machine has no CUDA device"))
    for extra, message in cases:
        output = [] if "--output" in extra else ["--output", str(tmp_path / "out")]
        code, err = run_cli(["--prompt", "x", *output, *extra], capsys)
        assert code == 2 and err.count(message) == 1 and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()

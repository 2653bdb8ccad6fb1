"""ENATInpaintPipeline / ENATImg2ImgPipeline: kept tokens, token masks, the edit schedule, strength, re-masking,
feature reuse, input checks, loading, and examples/edit.py."""

import importlib.util
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, tiny_class_pipeline, tiny_text_pipeline

from enat_diffusers import (
    ENATImg2ImgPipeline,
    ENATInpaintPipeline,
    ENATPipeline,
    MaskedTokenScheduler,
    box_mask,
    edit_mask_counts,
    outpaint_inputs,
)


L = 16  # tiny models: 4x4 tokens, 8x8 images, VQ factor 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def class_pipe():
    return tiny_class_pipeline()


@pytest.fixture(scope="module")
def inpaint(class_pipe):
    pipe = ENATInpaintPipeline(**class_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img(class_pipe):
    pipe = ENATImg2ImgPipeline(**class_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class ForwardRecorder:
    """Per transformer forward: the input ids, whether a reuse state came in, and the tokens the encoder saw."""

    def __init__(self, transformer):
        self.calls = []
        self.handles = [
            transformer.register_forward_pre_hook(self.forward, with_kwargs=True),
            transformer.encoder_blocks[0].register_forward_pre_hook(self.encoder),
        ]

    def forward(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append(dict(ids=ids.clone(), reuse=kwargs.get("reuse_state") is not None, encoded=0))

    def encoder(self, module, args):
        self.calls[-1]["encoded"] = args[0].shape[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def masked_counts_callback(record):
    def callback(pipe, step, timestep, tensors):
        record.append(int((tensors["latents"][0] == pipe.transformer.mask_token_id).sum()))
        return {}

    return callback


# ------------------------------------------------------------------------------------------------- inpainting


def test_inpaint_keeps_known_tokens_and_regenerates_masked_ones(inpaint, image):
    mask = box_mask(8, 8, (0, 0, 4, 4))  # the top-left 2x2 tokens
    token_mask = inpaint.get_token_mask(mask)[0]
    assert token_mask.sum() == 4 and token_mask[:2, :2].all()
    encoded = inpaint.encode_image(image)[0]
    ids = inpaint(
        class_labels=[1, 2],
        image=image,
        mask_image=mask,
        num_images_per_prompt=2,
        generator=[seeded(i) for i in range(4)],
        output_type="latent",
    ).images
    assert ids.shape == (4, 4, 4) and ids.dtype == torch.long
    assert (ids[:, ~token_mask] == encoded[~token_mask]).all()
    assert ((ids >= 0) & (ids < inpaint.transformer.config.codebook_size)).all()
    # one generator per image: the first image does not depend on the rest of the batch
    alone = inpaint(class_labels=[1], image=image, mask_image=mask, generator=[seeded(0)], output_type="latent").images
    assert torch.equal(alone[0], ids[0])


def test_token_mask_from_pixel_mask(inpaint):
    pixel = np.zeros((8, 8), dtype=np.float32)
    pixel[3, 5] = 1.0  # one pixel of token (row 1, column 2)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 1, 2] = True
    as_pil = PIL.Image.fromarray((pixel * 255).astype(np.uint8), mode="L").convert("RGB")
    for mask in (pixel, torch.from_numpy(pixel), torch.from_numpy(pixel)[None, None], pixel > 0.5, as_pil):
        assert torch.equal(inpaint.get_token_mask(mask), expected), type(mask)
    # binarised at 0.5; several masks give a batch
    assert not inpaint.get_token_mask(pixel * 0.4).any() and torch.equal(inpaint.get_token_mask(pixel * 0.6), expected)
    assert inpaint.get_token_mask([pixel, pixel]).shape == (2, 4, 4)


def test_full_mask_inpainting_is_generation(class_pipe, inpaint, image):
    expected = class_pipe(class_labels=[3], generator=seeded(5), output_type="latent").images
    ids = inpaint(class_labels=[3], image=image, mask_image=np.ones((8, 8)), generator=seeded(5), output_type="latent")
    assert torch.equal(ids.images, expected)


def test_edit_schedule():
    ratios = [math.cos(math.pi / 2 * (k + 1) / 8) for k in range(8)]
    assert edit_mask_counts(L, ratios) == [math.floor(L * r) for r in ratios] == [15, 14, 13, 11, 8, 6, 3, 0]
    assert edit_mask_counts(4, [math.cos(math.pi / 2 * (k + 1) / 4) for k in range(4)]) == [3, 2, 1, 0]
    for masked in range(1, 40):
        for steps in range(1, masked + 1):
            counts = edit_mask_counts(masked, [math.cos(math.pi / 2 * (k + 1) / steps) for k in range(steps)])
            assert counts[-1] == 0 and all(a > b for a, b in zip([masked] + counts, counts))
    with pytest.raises(ValueError):
        edit_mask_counts(2, ratios)  # more steps than masked tokens


def test_steps_never_exceed_masked_tokens(inpaint, image):
    for box, masked in (((0, 0, 1, 1), 1), ((0, 0, 6, 2), 3), ((0, 0, 8, 4), 8)):
        record = []
        inpaint(
            class_labels=[0],
            image=image,
            mask_image=box_mask(8, 8, box),
            num_inference_steps=8,
            callback_on_step_end=masked_counts_callback(record),
            output_type="latent",
        )
        assert inpaint.num_timesteps == len(record) == min(8, masked)
        assert record[-1] == 0 and all(a > b for a, b in zip([masked] + record, record)), record
    assert record == [7, 6, 5, 4, 3, 2, 1, 0]  # 8 masked, 8 steps: ENAT's 7, 7, 6, ... clamped to one token a step


def test_reuse_encodes_known_tokens_once(inpaint, image):
    mask = box_mask(8, 8, (0, 0, 8, 4))  # 8 of 16 tokens
    for reuse in (True, False):
        record = []
        with ForwardRecorder(inpaint.transformer) as recorder:
            inpaint(
                class_labels=[0],
                image=image,
                mask_image=mask,
                num_inference_steps=4,
                reuse_features=reuse,
                guidance_scale=1.0,
                callback_on_step_end=masked_counts_callback(record),
                output_type="latent",
            )
        calls = recorder.calls
        before = [8] + record[:-1]  # masked tokens in each step's input
        assert len(calls) == 4 and [int((c["ids"][0] == 8).sum()) for c in calls] == before
        assert calls[0]["ids"].shape[0] == 2  # guided steps: cond and uncond in one batch
        if reuse:  # step 0 encodes the 8 known tokens; then only the tokens revealed by the previous step
            assert [c["reuse"] for c in calls] == [False, True, True, True]
            assert [c["encoded"] for c in calls] == [L - 8] + [a - b for a, b in zip(before, before[1:])]
        else:
            assert not any(c["reuse"] for c in calls)
            assert [c["encoded"] for c in calls] == [L - n for n in before]


def test_inpaint_output_types_and_options(inpaint, image):
    mask = box_mask(8, 8, (4, 4, 8, 8))
    common = dict(class_labels=[1], image=image, mask_image=mask, generator=seeded(1))
    pil = inpaint(**common).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    assert inpaint(**common, output_type="np").images.shape == (1, 8, 8, 3)
    pt = inpaint(**common, output_type="pt", return_dict=False)[0]
    assert pt.shape == (1, 3, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    # temperatures 0: deterministic without a generator
    fixed = dict(common, generator=None, mask_temperature=0, sampling_temperature=0, output_type="latent")
    assert torch.equal(inpaint(**fixed).images, inpaint(**fixed).images)
    # PIL / numpy inputs give the same tokens as the tensor
    as_np = image[0].permute(1, 2, 0).numpy()
    assert torch.equal(inpaint.encode_image(as_np), inpaint.encode_image(image))


def test_outpainting_helper(inpaint, image):
    small = PIL.Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    padded, mask = outpaint_inputs(small, 2, 0, 2, 0, size=(8, 8))
    assert padded.size == mask.size == (8, 8)
    columns = np.asarray(mask)[0] > 0
    assert columns.tolist() == [True, True, False, False, False, False, True, True]
    token_mask = inpaint.get_token_mask(mask)[0]
    assert token_mask[:, [0, 3]].all() and not token_mask[:, 1:3].any()
    ids = inpaint(class_labels=[2], image=padded, mask_image=mask, generator=seeded(0), output_type="latent").images
    assert (ids[0][:, 1:3] == inpaint.encode_image(padded)[0][:, 1:3]).all()
    with pytest.raises(ValueError, match="padding"):
        outpaint_inputs(small, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------------- img2img


def first_input(pipe, **kwargs):
    with ForwardRecorder(pipe.transformer) as recorder:
        ids = pipe(**kwargs, output_type="latent").images
    return recorder.calls, ids


@pytest.mark.parametrize(
    "strength, count", [(0.01, 1), (0.2, 3), (0.25, 4), (0.5, 8), (0.53, 8), (0.97, 16), (1.0, 16)]
)
def test_img2img_strength_sets_the_number_of_remasked_tokens(img2img, image, strength, count):
    # rule: max(1, floor(strength * L + 0.5)); 0.2 * 16 = 3.2 -> 3, 0.53 * 16 = 8.48 -> 8, 0.97 * 16 = 15.52 -> 16
    calls, ids = first_input(img2img, class_labels=[0], image=image, strength=strength, generator=seeded(0))
    start = calls[0]["ids"][0]
    remasked = start == img2img.transformer.mask_token_id
    assert int(remasked.sum()) == count and img2img.num_timesteps == min(8, count)
    encoded = img2img.encode_image(image).flatten(1)[0]
    assert (ids.flatten(1)[0][~remasked] == encoded[~remasked]).all()


def test_random_and_confidence_remasking(img2img, image):
    def selection(remask, seed):
        calls, ids = first_input(
            img2img, class_labels=[4], image=image, strength=0.3, remask=remask, generator=seeded(seed)
        )
        return calls[-img2img.num_timesteps]["ids"][0] == 8, ids  # the first sampling step's input

    random_a, ids_a = selection("random", 0)
    random_again, ids_again = selection("random", 0)
    random_b, _ = selection("random", 1)
    confidence_a, conf_ids_a = selection("confidence", 0)
    confidence_b, _ = selection("confidence", 1)
    confidence_again, conf_ids_again = selection("confidence", 0)
    assert torch.equal(random_a, random_again) and torch.equal(ids_a, ids_again)  # reproducible
    assert torch.equal(confidence_a, confidence_again) and torch.equal(conf_ids_a, conf_ids_again)
    assert not torch.equal(random_a, random_b)  # random positions follow the generator
    assert torch.equal(confidence_a, confidence_b)  # confidence positions do not
    assert not torch.equal(random_a, confidence_a)
    # confidence = the lowest pseudo-log-likelihoods
    tokens = img2img.encode_image(image).flatten(1)
    scores = img2img.token_confidence(tokens, {"class_labels": torch.tensor([4])})
    assert torch.equal(confidence_a, scores[0] <= scores[0].sort().values[4])


def test_img2img_text_model_batches(image):
    pipe = ENATImg2ImgPipeline(**tiny_text_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    images = torch.cat([image, image.flip(-1)])
    with ForwardRecorder(pipe.transformer) as recorder:
        out = pipe(
            ["a red circle", "a blue square"],
            image=images,
            strength=0.5,
            remask="confidence",
            guidance_scale=2.0,
            num_images_per_prompt=2,
            generator=[seeded(i) for i in range(4)],
            output_type="pt",
        ).images
    assert out.shape == (4, 3, 8, 8)
    scoring, sampling = recorder.calls[:4], recorder.calls[4:]
    assert all(c["ids"].shape[0] == 2 for c in scoring)  # one row per prompt, no guidance
    start = sampling[0]["ids"][:4] == 8
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and (start.sum(1) == 8).all()
    # strength 1 is generation
    gen = ENATPipeline(**pipe.components)
    gen.set_progress_bar_config(disable=True)
    expected = gen("a red circle", generator=seeded(3), output_type="latent").images
    edited = pipe("a red circle", image=image, strength=1.0, generator=seeded(3), output_type="latent").images
    assert torch.equal(edited, expected)


# ------------------------------------------------------------------------------------------------------ errors


def test_input_errors(inpaint, img2img, image):
    good = dict(class_labels=[0], image=image, mask_image=box_mask(8, 8, (0, 0, 4, 4)), output_type="latent")
    two = torch.cat([image, image])
    unequal = [box_mask(8, 8, (0, 0, 2, 2)), box_mask(8, 8, (0, 0, 4, 4))]
    cases = [
        (ValueError, "image is 16x16", dict(image=torch.rand(1, 3, 16, 16))),
        (ValueError, "mask_image is 4x4", dict(mask_image=np.ones((4, 4)))),
        (ValueError, r"mask_image values must be finite and in \[0, 1\]", dict(mask_image=np.full((8, 8), 2.0))),
        (ValueError, r"image values must be finite and in \[0, 1\]", dict(image=image * 2 - 1)),
        (TypeError, "image arrays/tensors must be floating", dict(image=np.zeros((8, 8, 3), dtype=np.uint8))),
        (TypeError, "mask_image must be a PIL image", dict(mask_image="mask.png")),
        (ValueError, "mask_image must be single-channel", dict(mask_image=np.ones((8, 8, 3), dtype=np.float32))),
        (ValueError, "image must be RGB", dict(image=torch.rand(1, 1, 8, 8))),
        (ValueError, "masks no token", dict(mask_image=np.zeros((8, 8)))),
        (ValueError, "different numbers of tokens", dict(image=two, mask_image=unequal)),
        (ValueError, "Got 3 masks for 2 images", dict(image=two, mask_image=[np.ones((8, 8))] * 3)),
        (ValueError, r"Got 2 inputs \(image \(or mask\)\) for 3 prompts", dict(class_labels=[0, 1, 2], image=two)),
        (ValueError, "2 generators for 1 images", dict(generator=[seeded(), seeded()])),
        (ValueError, "Pass `mask_image`", dict(mask_image=None)),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            inpaint(**{**good, **change})
    good = dict(class_labels=[0], image=image, output_type="latent")
    for strength in (0, 0.0, -0.5, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="strength must be a number in"):
            img2img(**good, strength=strength)
    with pytest.raises(ValueError, match="remask must be one of"):
        img2img(**good, remask="lowest")
    with pytest.raises(ValueError, match="Pass the `image`"):
        img2img(class_labels=[0])
    with pytest.raises(ValueError, match="guidance_scale must be"):  # the shared checks of ENATPipeline
        img2img(**good, guidance_scale=-1)


def test_strategy_schedulers_need_enough_masked_tokens(class_pipe, image):
    scheduler = MaskedTokenScheduler(mask_token_id=8, mask_ratios=[0.75, 0.5, 0.25])  # a 4-step strategy
    pipe = ENATInpaintPipeline(transformer=class_pipe.transformer, scheduler=scheduler, vqvae=class_pipe.vqvae)
    pipe.set_progress_bar_config(disable=True)
    record = []
    pipe(
        class_labels=[0],
        image=image,
        mask_image=box_mask(8, 8, (0, 0, 8, 4)),
        output_type="latent",
        callback_on_step_end=masked_counts_callback(record),
    )
    assert record == [6, 4, 2, 0]  # floor(8 * ratio)
    with pytest.raises(ValueError, match="per-step strategy runs 4 steps"):
        pipe(class_labels=[0], image=image, mask_image=box_mask(8, 8, (0, 0, 4, 2)), output_type="latent")


# ---------------------------------------------------------------------------------------------- saving/loading


def test_generation_folder_loads_as_editing_pipelines(tmp_path, class_pipe, inpaint, image):
    class_pipe.save_pretrained(tmp_path / "gen")
    loaded = ENATInpaintPipeline.from_pretrained(tmp_path / "gen")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ENATInpaintPipeline) and loaded._exclude_from_cpu_offload == ["vqvae"]
    kwargs = dict(class_labels=[1], image=image, mask_image=box_mask(8, 8, (2, 2, 6, 6)), output_type="latent")
    assert torch.equal(loaded(**kwargs, generator=seeded(0)).images, inpaint(**kwargs, generator=seeded(0)).images)

    loaded.save_pretrained(tmp_path / "inpaint")
    index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert index["_class_name"] == "ENATInpaintPipeline"
    assert "import ENATInpaintPipeline" in (tmp_path / "inpaint" / "pipeline.py").read_text()
    for cls in (ENATImg2ImgPipeline, ENATPipeline, ENATInpaintPipeline):
        again = cls.from_pretrained(tmp_path / "inpaint")
        assert type(again) is cls and again.labels == class_pipe.labels


# ------------------------------------------------------------------------------------------ examples/edit.py


def load_edit_example():
    spec = importlib.util.spec_from_file_location("edit_example", ROOT / "examples" / "edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edit_example_end_to_end(tmp_path, class_pipe, capsys):
    edit = load_edit_example()
    model = tmp_path / "model"
    class_pipe.save_pretrained(model)
    source = tmp_path / "in.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(source)
    box_mask(8, 8, (0, 0, 3, 3)).save(tmp_path / "mask.png")
    names = ["after.png", "before.png", "mask.png", "side_by_side.png"]
    common = ["--model", str(model), "--image", str(source), "--class-labels", "1", "--steps", "3"]
    runs = {
        "inpaint": ["inpaint", *common, "--box", "0", "0", "4", "4"],
        "mask": ["inpaint", *common, "--mask", str(tmp_path / "mask.png")],
        "outpaint": ["outpaint", *common, "--pad", "2", "0", "2", "0"],
        "img2img": ["img2img", *common, "--strength", "0.5", "--remask", "confidence"],
    }
    for name, argv in runs.items():
        out = tmp_path / name
        edit.main([*argv, "--output-dir", str(out)])
        assert sorted(p.name for p in out.iterdir()) == names
        assert PIL.Image.open(out / "side_by_side.png").size == (3 * 8 + 2 * 4, 8)
        mask = np.asarray(PIL.Image.open(out / "mask.png"))
        if name in ("inpaint", "mask"):  # 2x2 tokens (the 3x3 pixel mask touches them all)
            assert (mask[:4, :4] == 255).all() and (mask[4:] == 0).all() and (mask[:, 4:] == 0).all()
        if name == "outpaint":
            assert (mask[:, :2] == 255).all() and (mask[:, 2:6] == 0).all()
    assert "tokens regenerated" in capsys.readouterr().out

    # existing outputs are refused before anything runs, and kept
    before = {p.name: p.read_bytes() for p in (tmp_path / "inpaint").iterdir()}
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        edit.main([*runs["inpaint"], "--output-dir", str(tmp_path / "inpaint"), "--seed", "1"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "inpaint").iterdir()} == before
    edit.main([*runs["inpaint"], "--output-dir", str(tmp_path / "inpaint"), "--overwrite"])
    with pytest.raises(SystemExit, match="strength must be a number"):
        edit.main(["img2img", *common, "--strength", "2", "--output-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()

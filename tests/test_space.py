"""The Gradio demo of examples/spaces: its handlers without a server, the API through gradio_client, and the page in
a real browser (Playwright driving the system Chromium). Tiny random-weight pipelines stand in for the real models,
except in the browser, which shows the shipped Shapes model when the repository has it."""

import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import PIL.Image
import pytest


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip(
    "gradio", reason="the demo's dependencies are not installed: pip install -r examples/spaces/requirements.txt"
)

from conftest import ROOT, tiny_class_pipeline, tiny_text_pipeline  # noqa: E402

from enat_diffusers import MaskedTokenScheduler  # noqa: E402


# gradio's queue trips pandas' deprecation warnings
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio"), pytest.mark.usefixtures("one_thread")]


APP = ROOT / "examples" / "spaces" / "app.py"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SHIPPED_MODEL = ROOT / "pretrained" / "enat-shapes"
HELD_OUT = "a large purple triangle on the left"


@pytest.fixture(scope="module")
def app():
    """examples/spaces/app.py, imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("enat_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "tiny-text"
    tiny_text_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def class_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "tiny-class"
    tiny_class_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_demo(app, text_model_dir):
    return app.EnatDemo(app.load_pipeline(str(text_model_dir)), str(text_model_dir))


@pytest.fixture(scope="module")
def class_demo(app, class_model_dir):
    return app.EnatDemo(app.load_pipeline(str(class_model_dir)), str(class_model_dir))


def serve(app, model_dir):
    """The app launched by its own `main` on 127.0.0.1, port 0: the system picks a free port when the server binds, so
    no other process can take it between a pick and the bind. Gradio reports the port it was given (0), so its server
    start is wrapped to read the bound port back."""
    from gradio import http_server

    start_server = http_server.start_server

    def start_on_bound_port(*args, **kwargs):
        server_name, port, url, server = start_server(*args, **kwargs)
        if port == 0:
            port = server.servers[0].sockets[0].getsockname()[1]
            url = url.replace(":0/", f":{port}/")
        return server_name, port, url, server

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_server, "start_server", start_on_bound_port)
        return app.main(["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0"], True)


def job_result(job, seconds: float = 600):
    """A gradio_client job's result, polled up to a generous deadline; a timeout reports the job's last status."""
    deadline = time.monotonic() + seconds
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"The job gave no result within {seconds:.0f} s; its last status: {job.status()}")
        time.sleep(0.05)
    return job.result()


@pytest.fixture(scope="module")
def browser_model_dir(text_model_dir):
    """The shipped Shapes model when the repository has it (the screenshot then shows real images), else a tiny one."""
    return SHIPPED_MODEL if (SHIPPED_MODEL / "model_index.json").is_file() else text_model_dir


@pytest.fixture(scope="module")
def text_server(app, browser_model_dir):
    """The app launched by its own `main` on 127.0.0.1 (port 0), in this process; closed afterwards."""
    blocks = serve(app, browser_model_dir)
    try:
        yield blocks.local_url
    finally:
        blocks.close()


# --------------------------------------------------------------------------------------- handlers, no server


def test_model_id_default_env_and_missing(app, text_model_dir, monkeypatch):
    monkeypatch.delenv("MODEL_ID", raising=False)
    assert app.default_model_id() == str(ROOT / "pretrained" / "enat-shapes")
    monkeypatch.setenv("MODEL_ID", str(text_model_dir))
    assert app.default_model_id() == str(text_model_dir)
    pipe = app.load_pipeline()  # from $MODEL_ID
    assert pipe.is_text_to_image and pipe.device.type == "cpu"
    with pytest.raises(FileNotFoundError, match="shipped Shapes model"):
        app.load_pipeline(str(ROOT / "no-such-dir" / "enat-shapes"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        app.load_pipeline(str(text_model_dir / "transformer"))
    # the page names a local folder by its last two parts, never by where the server keeps it
    assert app.display_name(str(text_model_dir)) == f"{text_model_dir.parent.name}/{text_model_dir.name}"
    assert app.display_name("org/enat-l-256") == "org/enat-l-256"


def test_text_generate(app, text_demo):
    gallery, gif_path, state, slider, frame, stats = text_demo.generate(HELD_OUT, 6, 2.0, 7, 1.5, 6.0, True, 3)
    assert len(gallery) == 3 and [caption for _, caption in gallery] == ["seed 7", "seed 8", "seed 9"]
    assert all(isinstance(image, PIL.Image.Image) and image.size == (256, 256) for image, _ in gallery)
    # the reveal: one frame per step, in a GIF inside the demo's temporary folder and behind the slider
    assert Path(gif_path).parent == Path(text_demo.output_dir)
    assert Path(gif_path).is_relative_to(tempfile.gettempdir())
    with PIL.Image.open(gif_path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 6
    assert len(state["frames"]) == 6 and state["revealed"][-1] == state["total"] == 16
    assert state["revealed"] == sorted(state["revealed"])
    assert slider["maximum"] == 6 and slider["value"] == 6
    assert frame["label"] == "Step 6 of 6: 16 of 16 tokens fixed"
    assert text_demo.show_step(state, 2)["label"].startswith("Step 2 of 6: ")
    assert text_demo.show_step(None, 2) == gr.update()
    # timing and FLOPs, with and without reuse (reuse encodes fewer tokens)
    assert "3 images" in stats and " s per image" in stats and "GFLOPs" in stats and "held-out" in stats
    assert "feature reuse on ✓ used" in stats and "feature reuse off |" in stats
    with_reuse, without_reuse = text_demo.flops_cache[(6, True, True)], text_demo.flops_cache[(6, True, False)]
    assert 0 < with_reuse < without_reuse
    # the same seed gives the same images; each image depends on its own seed only (seed + index)
    again, *_ = text_demo.generate(HELD_OUT, 6, 2.0, 8, 1.5, 6.0, True, 1)
    assert again[0][0].tobytes() == gallery[1][0].tobytes()
    assert len(text_demo.flops_cache) == 2  # measured once per (steps, guidance > 0, reuse)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(condition=""), "Please enter a prompt"),
        (dict(condition=" \n\t "), "Please enter a prompt"),
        (dict(condition=None), "Please enter a prompt"),
        (dict(condition=["a", "b"]), "must be text"),
        (dict(num_inference_steps=0), "Steps must be a whole number from 1 to 16"),
        (dict(num_inference_steps=17), "Steps must be a whole number"),
        (dict(num_inference_steps=2.5), "Steps must be a whole number"),
        (dict(num_inference_steps="many"), "Steps must be a whole number"),
        (dict(guidance_scale=-1), "Guidance must be a number from 0 to 10"),
        (dict(guidance_scale=float("nan")), "Guidance must be a number"),
        (dict(seed=-3), "Seed must be a whole number from 0 to 4294967295"),
        (dict(seed=1.5), "Seed must be a whole number"),
        (dict(mask_temperature=-0.1), "Mask temperature must be"),
        (dict(sampling_temperature=float("inf")), "Sampling temperature must be"),
        (dict(num_images=0), "Number of images must be a whole number from 1 to 8"),
        (dict(num_images=9), "Number of images must be a whole number from 1 to 8"),
    ],
)
def test_text_bad_inputs_are_friendly_errors(text_demo, kwargs, message):
    arguments = dict(condition="a small red circle in the centre", num_inference_steps=2)
    arguments.update(kwargs)
    with pytest.raises(gr.Error, match=message):
        text_demo.generate(**arguments)


def test_long_and_non_ascii_prompts(text_demo):
    tokenizer = text_demo.pipe.tokenizer
    text, notes = text_demo._prompt("a large red circle " * 20)
    assert 70 <= len(tokenizer(text).input_ids) <= 77 and text.startswith("a large red circle a large")
    assert len(notes) == 1 and "77 tokens" in notes[0]
    text, notes = text_demo._prompt("é" * 300)  # one long word: cut by characters
    assert 0 < len(tokenizer(text).input_ids) <= 77 and len(notes) == 1
    with pytest.warns(UserWarning, match=r"The prompt was cut \(.*77 tokens\)"):  # gr.Warning outside a server
        text_demo.generate("a large red circle " * 20, 2)
    with pytest.warns(UserWarning, match="longer than 500 characters"):
        gallery, *_ = text_demo.generate("x" * 5000, 2, 0.0, 1, 1.0, 1.0, True, 1)
    assert len(gallery) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a short non-ASCII prompt
        gallery, *_, stats = text_demo.generate("un grand cercle rouge à gauche 🎈\n\t日本の四角", 2, 1.0, 2)
    assert text_demo._prompt("  un\u00a0grand\n cercle\x00 ")[0] == "un grand cercle"
    assert len(gallery) == 1 and "held-out" not in stats


def test_class_generate_and_errors(app, class_demo):
    assert class_demo.class_choices[:2] == [("class 0 (0)", "0"), ("class 1 (1)", "1")]
    assert class_demo.default_condition == "0"
    gallery, gif_path, state, slider, frame, stats = class_demo.generate("3", 4, 1.0, 11, 1.0, 2.0, True, 2)
    assert [caption for _, caption in gallery] == ["seed 11", "seed 12"] and "2 images** of *class 3 (3)*" in stats
    assert len(state["frames"]) == 4 and Path(gif_path).is_file() and "GFLOPs" in stats
    for same in ("3", 3, "class 3", "CLASS 3", "class 3 (3)", 3.0):  # picker value, API text, class name
        assert class_demo._class_id(same) == 3
    for bad, message in [
        (None, "Please pick a class"),
        ("", "Please pick a class"),
        (42, "42 is not a class of this model"),
        (True, "is not a class"),
        ("clas 3", "Did you mean"),
    ]:
        with pytest.raises(gr.Error, match=message):
            class_demo.generate(bad, 2)


def test_per_step_strategy(app):
    """An AutoNAT-style scheduler fixes the steps and the settings it lists: the UI makes them read-only, the handler
    does not pass them on."""
    pipe = tiny_class_pipeline()
    pipe.scheduler = MaskedTokenScheduler(mask_token_id=8, mask_ratios=[0.75, 0.5, 0.25], guidance_scales=[0, 1, 2, 3])
    demo = app.EnatDemo(pipe, "strategy")
    assert demo.default_steps == demo.max_steps == 4 and demo.fixed_settings == {"guidance_scale"}
    gallery, _, state, _, _, stats = demo.generate("1", 4, 7.5, 0, 1.0, 1.0, True, 1)
    assert len(gallery) == 1 and len(state["frames"]) == 4 and "guidance on" in stats
    with pytest.raises(gr.Error, match="exactly 4 steps"):
        demo.generate("1", 3)
    blocks = demo.build()
    guidance = next(block for block in blocks.blocks.values() if getattr(block, "label", None) == "Guidance")
    mask_temperature = next(b for b in blocks.blocks.values() if getattr(b, "label", None) == "Mask temperature")
    assert guidance.interactive is False and "strategy" in guidance.info and mask_temperature.interactive is not False


def test_build_ui(app, text_demo, class_demo):
    text_blocks, class_blocks = text_demo.build(), class_demo.build()
    text_labels = {getattr(block, "label", None) for block in text_blocks.blocks.values()}
    assert {"Prompt", "Steps", "Guidance", "Seed", "Images", "Feature reuse", "Mask temperature"} <= text_labels
    dropdowns = [block for block in class_blocks.blocks.values() if isinstance(block, gr.Dropdown)]
    assert len(dropdowns) == 1 and dropdowns[0].label == "Class" and dropdowns[0].filterable
    assert len(dropdowns[0].choices) == 10
    assert not any(getattr(block, "label", None) == "Prompt" for block in class_blocks.blocks.values())
    assert 0 <= app.random_seed() <= app.MAX_SEED


# ------------------------------------------------------------------------------------------- over HTTP


def slider_value(output):
    return output["value"] if isinstance(output, dict) else output  # an update of the slider's range and value


def test_gradio_client(text_server):
    from gradio_client import Client

    client = Client(text_server, verbose=False)
    assert "/generate" in str(client.view_api(print_info=False, return_format="str"))
    job = client.submit("a small green square in the centre", 4, 1.5, 5, 1.0, 3.0, True, 2, api_name="/generate")
    gallery, gif_path, slider, frame, stats = job_result(job)
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert Path(gif_path).suffix == ".gif" and slider_value(slider) == 4 and "GFLOPs" in stats and "held-out" in stats
    with PIL.Image.open(gallery[0]["image"]) as image:
        assert image.format == "PNG" and image.size == (256, 256)
    job = client.submit("", 4, 1.5, 5, 1.0, 3.0, True, 2, api_name="/generate")
    with pytest.raises(Exception, match="Please enter a prompt"):
        job_result(job)
    seed = client.predict(api_name="/random_seed")
    assert isinstance(seed, (int, float)) and 0 <= seed <= 2**32 - 1


def test_gradio_client_class_conditional(app, class_model_dir):
    from gradio_client import Client

    blocks = serve(app, class_model_dir)
    try:
        client = Client(blocks.local_url, verbose=False)
        gallery, gif_path, slider, frame, stats = job_result(
            client.submit("7", 3, 0.0, 1, 1.0, 1.0, False, 1, api_name="/generate")
        )
        assert len(gallery) == 1 and gallery[0]["caption"] == "seed 1" and slider_value(slider) == 3
        assert "of *class 7 (7)*" in stats and "feature reuse off ✓ used" in stats
        with pytest.raises(Exception, match="not in the list of choices"):  # the picker accepts its choices only
            job_result(client.submit("11", 3, 0.0, 1, 1.0, 1.0, False, 1, api_name="/generate"))
    finally:
        blocks.close()


# ----------------------------------------------------------------------------------------------- browser


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
)
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None, reason="playwright is not installed (pip install playwright)"
)
def test_browser(text_server, browser_model_dir, tmp_path):
    import playwright.sync_api as playwright_api

    sample_size = json.loads((browser_model_dir / "transformer" / "config.json").read_text())["sample_size"]
    num_tokens = sample_size**2

    expect = playwright_api.expect
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(text_server, timeout=30_000)
            prompt = page.get_by_label("Prompt")
            prompt.fill("a small green square at the top and a large red circle at the bottom")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#enat-gallery img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#enat-gallery img")).to_have_count(4, timeout=10_000)
            expect(page.locator("#enat-reveal img")).to_be_visible(timeout=10_000)
            assert ".gif" in page.locator("#enat-reveal img").get_attribute("src")
            assert str(browser_model_dir.resolve().parent.parent) not in page.content()
            expect(page.locator("#enat-step-frame img")).to_be_visible()
            expect(page.locator("#enat-stats")).to_contain_text("GFLOPs")
            expect(page.locator("#enat-stats")).to_contain_text("held-out")
            expect(page.get_by_text(f"Step 8 of 8: {num_tokens} of {num_tokens} tokens fixed")).to_be_visible()
            step_box = page.locator("#enat-step-slider input[type=number]")  # the slider's number box
            step_box.fill("3")
            step_box.press("Enter")
            expect(page.get_by_text("Step 3 of 8: ")).to_be_visible(timeout=10_000)
            screenshot = tmp_path / "space.png"
            page.screenshot(path=str(screenshot), full_page=True)
            # an empty prompt: a friendly message, not a traceback
            prompt.fill("")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("Please enter a prompt").first).to_be_visible(timeout=10_000)
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "space_error.png"))
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000

"""Reference images on a rule (issue 13.5): shown before the file in every request of the rule.

Checked three ways: ``check`` warns of a missing one with file:line (its
files then fail with its name),
``explain`` lists them, and the real daemon's requests carry them first
(the stub backend logs how many images each request had; its answer for a
chat is not involved).  ``Worker.prepare`` is checked directly for the
order and the sizes.
"""

from __future__ import annotations

from pathlib import Path

from daemon.backends import create_backend, expected_requests
from daemon.config_reader import load_config
from daemon.engine.worker import Worker
from daemon.pages import shown_size
from daemon.intake.rules import match_file
from tests.conftest import run_vlwatch, write_config
from tests.test_daemon import Daemon, png_bytes, put

ENV = {"VLWATCH_PLUGINS": "tests.stub_backend"}


def reference_config(tmp_path: Path, reference: str = "[brand/style.png, brand/logo.png]") -> Path:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    put(tmp_path / "brand" / "style.png", png_bytes(1, (300, 200)))
    put(tmp_path / "brand" / "logo.png", png_bytes(2, (64, 64)))
    return write_config(tmp_path, f"""
        model: {{backend: stub, name: stub-model, max_pixels: 50000}}
        state: ./state/state.db
        watch:
          - path: ./inbox
            settle: 0.3s
        rules:
          - name: on-brand
            task: custom
            output: md
            prompt: "The first two images are our style guide and logo. Does $filename follow them?"
            reference: {reference}
        api: {{listen: null}}
        """)


def test_prepare_puts_reference_images_first(tmp_path: Path) -> None:  # issue 13.5
    config_path = reference_config(tmp_path)
    import tests.stub_backend  # noqa: F401  (registers the stub backend)

    config = load_config(config_path)
    image = put(tmp_path / "inbox" / "shot.png", png_bytes(3, (120, 90)))
    [match] = match_file(config, image)
    worker = Worker(config, create_backend(config.model))
    prepared = worker.prepare(match)
    [(_, request)] = prepared.take()
    sizes = [img.size for img in request.images]
    expect = [shown_size(w, h, min_pixels=config.model.min_pixels, max_pixels=50000)
              for w, h in ((300, 200), (64, 64), (120, 90))]
    assert sizes == expect  # style guide, logo, then the file
    assert prepared.pages[0].shown == expect[2]  # boxes still map to the file's own page


def test_explain_lists_them_and_check_warns_of_a_missing_one(tmp_path: Path) -> None:  # issue 13.5
    config = reference_config(tmp_path)
    image = put(tmp_path / "inbox" / "shot.png", png_bytes(3))
    done = run_vlwatch("explain", image, "--config", config, env=ENV)
    assert done.returncode == 0, done.stderr
    assert f"reference: {tmp_path / 'brand' / 'style.png'}" in done.stdout
    assert f"reference: {tmp_path / 'brand' / 'logo.png'}" in done.stdout
    config = reference_config(tmp_path, "[brand/nope.png]")
    done = run_vlwatch("check", "--config", config, env=ENV)
    line = next(n for n, t in enumerate(config.read_text().splitlines(), 1) if "reference:" in t)
    assert done.returncode == 0  # a warning: the machine that checks may not have it
    assert f"config.yaml:{line}: rules[0].reference: reference image {tmp_path / 'brand' / 'nope.png'} does not exist" \
        in done.stdout
    image = put(tmp_path / "inbox" / "late.png", png_bytes(4))
    done = run_vlwatch("process", image, "--config", config, env=ENV)
    assert done.returncode == 1 and "reference image" in done.stderr and "nope.png" in done.stderr


def test_the_daemon_sends_them_with_every_file(tmp_path: Path) -> None:  # issue 13.5
    config = reference_config(tmp_path)
    log = tmp_path / "stub.log"
    d = Daemon(tmp_path, config, VLWATCH_STUB_LOG=str(log), **ENV).start()
    try:
        images = [put(tmp_path / "inbox" / f"s{i}.png", png_bytes(10 + i)) for i in range(3)]
        for image in images:
            d.wait_done(image, "on-brand")
    finally:
        d.stop()
        d.close()
    counts = [int(line.split()[1]) for line in log.read_text().splitlines()]
    assert counts == [3, 3, 3]  # two references + the file, per request


def test_the_engine_is_told_each_rules_requests_ahead_reference_images_included(tmp_path: Path) -> None:
    # issue 22 (call S1): the engine sizes its cache for the daemon's rules before the first job comes
    # (backends.expected_requests); a rule's reference images make its requests longer, and the sizing must cover them.
    import tests.stub_backend  # noqa: F401  (registers the stub backend)

    config = load_config(reference_config(tmp_path))
    [expected] = expected_requests(config)
    image = put(tmp_path / "inbox" / "shot.png", png_bytes(3, (400, 300)))
    [(_, request)] = Worker(config, create_backend(config.model)).prepare(match_file(config, image)[0]).take()
    assert len(request.images) == 3
    assert expected.image_tokens >= sum(w * h // 28 ** 2 for w, h in (img.size for img in request.images))
    assert expected.prompt.startswith("The first two images are our style guide and logo. Does ")
    assert expected.max_new_tokens == config.model.max_new_tokens

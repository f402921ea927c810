"""Data validation against a generated dirty corpus: every real-world failure case, by path and kind.

The corpus (:func:`build_dirty_corpus`) is written with Pillow into ``tmp_path``; no network, no
fixtures data. ``workers=1`` keeps most tests in-process; one test checks the process pool gives
identical results, one that a crashing decoder only costs its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from vggflow.config import DataConfig, ValidationConfig
from vggflow.errors import DataError, VggflowError
from vggflow.images import ImageDecodeError, inspect_files, load_rgb, open_image, to_rgb
from vggflow.tasks.validate import run_validation, validate_data
from vggflow.validation import (
    ISSUE_KINDS,
    MANIFEST_COLUMNS,
    ValidationResult,
    dataset_fingerprint,
    decode,
    format_summary,
    read_manifest,
    report_json,
    rules,
    split_of,
    validate_dataset,
    write_validation_outputs,
)

DATA_CFG = DataConfig()
SERIAL = ValidationConfig(workers=1, min_side=8, drop_small_classes=True)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def pattern(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A smooth random RGB picture: distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "RGB")
    return coarse.resize(size, Image.Resampling.BICUBIC)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB pixels, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def build_dirty_corpus(root: Path) -> tuple[Path, dict[str, str], dict[str, int]]:
    """Write ``root/data`` with one file per real-world failure case.

    Returns:
        (data dir, {relative path: expected issue kind}, {class: expected usable count} under
        ``SERIAL`` — the single-image class ``birds`` is dropped as too small).
    """
    data = root / "data"
    cats, dogs, birds = data / "cats", data / "dogs", data / "birds"
    for folder in (cats, dogs, birds, data / "empty_class", cats / "sub", root / "outside"):
        folder.mkdir(parents=True)
    expected: dict[str, str] = {}

    # Valid images in every accepted format and mode (usable, no issue).
    pattern(1).save(cats / "photo.jpg", quality=92)
    pattern(2).save(cats / "lossless.png")
    pattern(3).save(cats / "bitmap.bmp")
    pattern(4).quantize(64).save(cats / "palette.gif")
    pattern(5).save(cats / "modern.webp", quality=90)
    pattern(6).save(cats / "scan.tiff")
    pattern(7).save(cats / "SHOUTING.JPG")
    pattern(8).convert("CMYK").save(cats / "print_cmyk.jpg")
    pattern(9).convert("LA").save(cats / "grey_alpha.png")
    transparent = pattern(10).quantize(32)
    transparent.info["transparency"] = 0
    transparent.save(cats / "palette_transparent.png", transparency=0)
    pattern(11).convert("RGBA").save(cats / "rgba.png")
    grey16 = (np.asarray(pattern(12).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(cats / "deep_16bit.png")
    pattern(13).save(cats / "sub" / "nested.png")
    pattern(14).save(cats / "-leading dash ünïcode.png")
    # Usable but suspicious.
    pattern(15).save(cats / "really_a_png.jpg", format="PNG")
    expected["cats/really_a_png.jpg"] = "wrong_extension"
    # 3% brighter and 25% larger: pHash distance 2 (distinct patterns are >= 14 apart).
    brighter = ImageEnhance.Brightness(pattern(1)).enhance(1.03).resize((80, 60), Image.Resampling.BICUBIC)
    brighter.save(cats / "photo_edited.png")
    expected["cats/photo_edited.png"] = "near_duplicate"
    expected["cats/photo.jpg"] = "near_duplicate"
    # Same bytes twice in a class: kept once (first path wins), also via a symlink inside DATA_DIR.
    (cats / "lossless_copy.png").write_bytes((cats / "lossless.png").read_bytes())
    expected["cats/lossless_copy.png"] = "duplicate"
    os.symlink("bitmap.bmp", cats / "zz_link_to_bitmap.bmp")
    expected["cats/zz_link_to_bitmap.bmp"] = "duplicate"
    # Excluded files.
    (cats / "zero.jpg").write_bytes(b"")
    expected["cats/zero.jpg"] = "empty"
    jpeg = (cats / "photo.jpg").read_bytes()
    (cats / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    expected["cats/truncated.jpg"] = "corrupt"
    (cats / "notes_really.jpg").write_text("this is not a picture\n")
    expected["cats/notes_really.jpg"] = "not_an_image"
    pattern(16, (4, 4)).save(cats / "tiny.png")
    expected["cats/tiny.png"] = "too_small"
    (cats / "bomb.png").write_bytes(png_bomb(100_000, 100_000))
    expected["cats/bomb.png"] = "too_large"
    (cats / "bomb_below_pillow_limit.png").write_bytes(png_bomb(10_000, 10_000))
    expected["cats/bomb_below_pillow_limit.png"] = "too_large"
    pattern(17).save(root / "outside" / "secret.png")
    os.symlink(root / "outside" / "secret.png", cats / "escape.png")
    expected["cats/escape.png"] = "outside_data_dir"
    os.symlink(root / "outside", cats / "escape_dir")
    expected["cats/escape_dir"] = "outside_data_dir"
    os.symlink("../dogs/../../outside/secret.png", dogs / "sneaky_relative.png")
    expected["dogs/sneaky_relative.png"] = "outside_data_dir"
    os.symlink("does_not_exist.png", cats / "dangling.png")
    expected["cats/dangling.png"] = "broken_symlink"
    os.mkfifo(cats / "pipe.png")
    expected["cats/pipe.png"] = "not_a_regular_file"
    (cats / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\0" * 64)
    expected["cats/photo.heic"] = "unsupported_format"
    # Ignored.
    (cats / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 32)
    expected["cats/.DS_Store"] = "os_junk"
    (dogs / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 32)
    expected["dogs/Thumbs.db"] = "os_junk"
    pattern(18).save(cats / ".hidden.png")
    expected["cats/.hidden.png"] = "hidden"
    (cats / ".ipynb_checkpoints").mkdir()
    pattern(19).save(cats / ".ipynb_checkpoints" / "x.png")
    expected["cats/.ipynb_checkpoints"] = "hidden"
    (data / "__MACOSX").mkdir()
    expected["__MACOSX"] = "os_junk"
    (cats / "labels.txt").write_text("cat\n")
    expected["cats/labels.txt"] = "non_image_file"
    (data / "README.md").write_text("# my dataset\n")
    expected["README.md"] = "top_level_file"
    os.symlink("..", cats / "sub" / "loop")
    expected["cats/sub/loop"] = "symlink_loop"
    # Dogs: four usable pictures, and one whose bytes are also a cat (label conflict: both out).
    for index in range(4):
        pattern(30 + index).save(dogs / f"dog_{index}.png")
    pattern(40).save(cats / "ambiguous.png")
    (dogs / "ambiguous_too.png").write_bytes((cats / "ambiguous.png").read_bytes())
    expected["cats/ambiguous.png"] = "label_conflict"
    expected["dogs/ambiguous_too.png"] = "label_conflict"
    # A class below min_images_per_class, and an empty class folder (only junk in it).
    pattern(50).save(birds / "lonely.png")
    expected["birds/lonely.png"] = "small_class"
    (data / "empty_class" / ".DS_Store").write_bytes(b"junk")
    expected["empty_class"] = "empty_class"
    expected["empty_class/.DS_Store"] = "os_junk"

    usable_cats = [
        "photo.jpg", "lossless.png", "bitmap.bmp", "palette.gif", "modern.webp", "scan.tiff", "SHOUTING.JPG",
        "print_cmyk.jpg", "grey_alpha.png", "palette_transparent.png", "rgba.png", "deep_16bit.png",
        "sub/nested.png", "-leading dash ünïcode.png", "really_a_png.jpg", "photo_edited.png",
    ]  # fmt: skip
    return data, expected, {"cats": len(usable_cats), "dogs": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, int]]:
    return build_dirty_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def result(corpus: tuple[Path, dict[str, str], dict[str, int]]) -> ValidationResult:
    return validate_dataset(corpus[0], DATA_CFG, SERIAL)


def issue_pairs(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(issue["path"], issue["kind"]) for issue in report["issues"]}


# --------------------------------------------------------------------------------------------
# The corpus, case by case
# --------------------------------------------------------------------------------------------


def test_every_case_reported_by_path_and_kind(corpus, result: ValidationResult) -> None:
    _, expected, _ = corpus
    found = issue_pairs(result.report)
    missing = {(path, kind) for path, kind in expected.items() if (path, kind) not in found}
    assert not missing, f"not reported: {sorted(missing)}\nreported: {sorted(found)}"


def test_no_unexpected_issues(corpus, result: ValidationResult) -> None:
    _, expected, _ = corpus
    unexpected = {(path, kind) for path, kind in issue_pairs(result.report) if expected.get(path) != kind}
    assert not unexpected


def test_status_of_each_file_matches_its_kind(corpus, result: ValidationResult) -> None:
    _, expected, _ = corpus
    status = dict(zip(result.manifest["path"], result.manifest["status"]))
    for path, kind in expected.items():
        want = ISSUE_KINDS[kind][0]
        if want == "-" or path in ("cats/.ipynb_checkpoints", "__MACOSX"):  # folders have no row
            assert path not in status
        else:
            assert status[path] == want, path


def test_exact_valid_count_and_classes(corpus, result: ValidationResult) -> None:
    _, _, classes = corpus
    summary = result.report["summary"]
    assert summary["n_valid"] == sum(classes.values()) == 20
    assert summary["classes"] == classes
    assert len(result.usable) == 20
    assert summary["n_files"] == len(result.manifest)
    assert summary["n_valid"] + summary["n_excluded"] + summary["n_ignored"] == summary["n_files"]
    assert result.ok, result.errors
    # The symlink escaping DATA_DIR was never read: its target's content is nowhere.
    secret = hashlib.sha256((corpus[0].parent / "outside" / "secret.png").read_bytes()).hexdigest()
    assert secret not in set(result.manifest["sha256"])


def test_every_excluded_file_is_in_issues(result: ValidationResult) -> None:
    reported = {issue["path"] for issue in result.report["issues"]}
    not_ok = result.manifest[result.manifest["status"] != "ok"]
    assert set(not_ok["path"]) <= reported


def test_usable_rows_decode_through_the_shared_path(corpus, result: ValidationResult) -> None:
    data_dir = corpus[0]
    for row in result.usable.itertuples():
        rgb = load_rgb(data_dir / row.path)
        assert rgb.dtype == np.uint8 and rgb.shape == (row.height, row.width, 3)
    modes = dict(zip(result.usable["path"], result.usable["mode"]))
    assert modes["cats/print_cmyk.jpg"] == "CMYK"
    assert modes["cats/deep_16bit.png"].startswith("I")
    formats = dict(zip(result.usable["path"], result.usable["format"]))
    assert formats["cats/really_a_png.jpg"] == "PNG"
    assert formats["cats/SHOUTING.JPG"] == "JPEG"


def test_rows_file_lists_the_usable_rows_with_their_measured_sizes(corpus, result: ValidationResult, tmp_path) -> None:
    """Training reads rows.csv, not the manifest: each image's decoded size travels with it."""
    from vggflow.files import ROWS_COLUMNS, read_rows

    validated = run_validation(DataConfig(dir=corpus[0]), SERIAL, tmp_path, None)
    rows = read_rows(validated.rows_file)
    assert tuple(rows.columns) == ROWS_COLUMNS
    assert rows.astype({"height": int, "width": int}).equals(result.usable[list(ROWS_COLUMNS)].reset_index(drop=True))


def test_manifest_columns_and_types(result: ValidationResult) -> None:
    manifest = result.manifest
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert list(manifest["path"]) == sorted(manifest["path"])
    assert set(manifest["status"]) <= {"ok", "excluded", "duplicate", "ignored"}
    usable = result.usable
    assert set(usable["split"]) <= {"train", "val", "test"}
    assert (manifest.loc[manifest["status"] != "ok", "split"] == "").all()
    assert usable["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert usable["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (usable["width"] > 0).all() and (usable["bytes"] > 0).all()
    assert usable["mean"].between(0, 255).all()


def test_small_class_is_an_error_naming_it_unless_dropped(corpus) -> None:
    strict = validate_dataset(corpus[0], DATA_CFG, ValidationConfig(workers=1))
    assert not strict.ok
    assert any("birds (1)" in error for error in strict.errors)
    assert "birds" in strict.report["summary"]["classes"]


def test_fewer_than_two_classes_is_not_usable(tmp_path: Path) -> None:
    for index in range(5):
        pattern(index).save((tmp_path / "only").mkdir(exist_ok=True) or tmp_path / "only" / f"{index}.png")
    (tmp_path / "empty").mkdir()
    outcome = validate_dataset(tmp_path, DATA_CFG, SERIAL)
    assert not outcome.ok
    assert any("fewer than 2 usable classes" in error for error in outcome.errors)
    assert ("empty", "empty_class") in issue_pairs(outcome.report)


def test_missing_or_class_less_data_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        validate_dataset(tmp_path / "nope", DATA_CFG, SERIAL)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        validate_dataset(tmp_path / "file.png", DATA_CFG, SERIAL)
    with pytest.raises(DataError, match="no class folders"):
        validate_dataset(tmp_path, DATA_CFG, SERIAL)


# --------------------------------------------------------------------------------------------
# Decoding and conversion
# --------------------------------------------------------------------------------------------


def test_decompression_bomb_refused_quickly_without_allocating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jpg"  # the extension does not matter: content decides
    bomb.write_bytes(png_bomb(100_000, 100_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for _ in range(20):
        with pytest.raises(ImageDecodeError) as caught:
            open_image(bomb, max_pixels=50_000_000)
        assert caught.value.kind == "too_large"
    assert time.perf_counter() - started < 2.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024  # 10^10 RGB pixels would be 30 GB


def test_to_rgb_every_mode() -> None:
    white16 = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    assert white16.mode == "I;16"
    assert (to_rgb(white16) == 255).all()
    mid16 = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert (to_rgb(mid16) == 128).all()
    assert (to_rgb(Image.new("LA", (3, 3), (0, 0))) == 255).all()  # transparent → white
    assert (to_rgb(Image.new("RGBA", (3, 3), (10, 20, 30, 0))) == 255).all()
    assert (to_rgb(Image.new("RGBA", (3, 3), (10, 20, 30, 255))) == [10, 20, 30]).all()
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    assert (to_rgb(palette) == 255).all()
    assert (to_rgb(Image.new("L", (2, 2), 77)) == 77).all()
    assert (to_rgb(Image.new("1", (2, 2), 1)) == 255).all()
    cmyk = to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert (cmyk == [255, 0, 0]).all()
    for mode in ("I;16", "LA", "RGBA", "P", "L", "CMYK", "RGB", "1", "I", "F"):
        image = Image.new(mode, (5, 3))
        assert to_rgb(image).shape == (3, 5, 3) and to_rgb(image).dtype == np.uint8


def test_exif_orientation_applied_same_pixels_as_pillows_copying_path_no_file_left_open(tmp_path: Path) -> None:
    """load_rgb (in-place EXIF transpose, no RGB→RGB copy) gives the pixels of Pillow's copying path."""
    from PIL import ImageOps

    photo = pattern(7, (40, 24))
    files = {}
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation
        files[orientation] = tmp_path / f"o{orientation}.jpg"
        photo.save(files[orientation], exif=exif.tobytes(), quality=95)
    files["plain"] = tmp_path / "plain.jpg"
    photo.save(files["plain"], quality=95)
    for mode in ("L", "P", "RGBA", "CMYK", "I;16"):
        files[mode] = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        (
            photo.convert(mode)
            if mode != "I;16"
            else Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
        ).save(files[mode])
    for extension in ("gif", "tiff", "mpo", "webp"):  # multi-frame files: the first frame is used
        files[extension] = tmp_path / f"frames.{extension}"
        photo.save(files[extension], save_all=True, append_images=[pattern(8, (40, 24))])
    rotated = Image.Exif()
    rotated[0x0112] = 6
    for extension in ("mpo", "webp", "png"):  # orientation outside plain JPEGs, multi-frame included
        files[f"{extension} 6"] = tmp_path / f"rotated.{extension}"
        photo.save(
            files[f"{extension} 6"],
            save_all=extension != "png",
            append_images=[pattern(9, (40, 24))],
            exif=rotated.tobytes(),
        )

    open_before = len(os.listdir("/proc/self/fd"))
    for name, path in files.items():
        with Image.open(path) as reference:
            expected = to_rgb(ImageOps.exif_transpose(reference))  # the copying path, in place of ours
        got = load_rgb(path)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name
        if name in (6, 8) or str(name).endswith(" 6"):  # rotated by 90°: width and height swap
            assert got.shape == (40, 24, 3), name
        else:
            assert got.shape == (24, 40, 3), name
    assert np.array_equal(load_rgb(files[3]), np.asarray(Image.open(files["plain"]).convert("RGB"))[::-1, ::-1])
    assert len(os.listdir("/proc/self/fd")) == open_before  # every file handle closed


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def write_class_images(root: Path, per_class: int, start: int = 0, classes: Sequence[str] = ("a", "b", "c")) -> None:
    for offset, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + per_class):
            pattern(10_000 * (offset + 1) + index, (24, 24)).save(root / label / f"{index:03d}.png")


def test_split_follows_the_documented_content_hash_rule(result: ValidationResult) -> None:
    for row in result.usable.itertuples():
        digest = hashlib.sha256(b"vggflow-split:" + row.sha256.encode()).hexdigest()
        u = int(digest[:16], 16) / 2**64
        natural = "test" if u < 0.15 else "val" if u < 0.30 else "train"
        assert split_of(row.sha256, DATA_CFG) == natural
    big = result.usable[result.usable["label"] == "cats"]
    assert set(big["split"]) == {"train", "val", "test"}


def test_adding_images_never_moves_existing_ones(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=40)
    first = validate_dataset(tmp_path, DATA_CFG, SERIAL).usable
    # Big enough that the tiny-class fix-up did not move anything: every split is the natural one.
    assert (first["split"] == [split_of(sha, DATA_CFG) for sha in first["sha256"]]).all()
    write_class_images(tmp_path, per_class=25, start=40)
    second = validate_dataset(tmp_path, DATA_CFG, SERIAL).usable.set_index("path")
    assert len(second) == 3 * 65
    assert (second.loc[first["path"], "split"].to_numpy() == first["split"].to_numpy()).all()


def test_tiny_class_gets_one_image_in_every_split(tmp_path: Path) -> None:
    write_class_images(tmp_path, per_class=3, classes=("x", "y", "z", "w"))
    usable = validate_dataset(tmp_path, DATA_CFG, SERIAL).usable
    for label, rows in usable.groupby("label"):
        assert sorted(rows["split"]) == ["test", "train", "val"], label


def test_fill_empty_splits_moves_the_nearest_images() -> None:
    def rows(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
        return [{"path": f"{i}", "split": split, "_u": u} for i, (split, u) in enumerate(pairs)]

    only_train = rows(("train", 0.9), ("train", 0.5), ("train", 0.7), ("train", 0.35))
    rules._fill_empty_splits(only_train)
    assert [r["split"] for r in only_train] == ["train", "val", "train", "test"]
    only_test = rows(("test", 0.01), ("test", 0.05), ("test", 0.1))
    rules._fill_empty_splits(only_test)
    assert [r["split"] for r in only_test] == ["test", "val", "train"]


def test_duplicates_cannot_straddle_splits(result: ValidationResult) -> None:
    manifest = result.manifest
    usable_hashes = result.usable["sha256"]
    assert usable_hashes.is_unique
    copies = manifest[manifest["status"] == "duplicate"]
    assert (copies["split"] == "").all()
    assert set(copies["sha256"]) <= set(usable_hashes)


# --------------------------------------------------------------------------------------------
# Determinism, parallelism, crashes
# --------------------------------------------------------------------------------------------


def test_output_is_deterministic(corpus, result: ValidationResult) -> None:
    again = validate_dataset(corpus[0], DATA_CFG, SERIAL)
    pd.testing.assert_frame_equal(again.manifest, result.manifest)
    assert report_json(again.report) == report_json(result.report)
    assert dataset_fingerprint(again) == dataset_fingerprint(result)


def test_process_pool_gives_identical_results(corpus, result: ValidationResult, monkeypatch) -> None:
    monkeypatch.setattr(decode, "SERIAL_BELOW", 0)
    pooled = validate_dataset(corpus[0], DATA_CFG, ValidationConfig(workers=2, min_side=8, drop_small_classes=True))
    pd.testing.assert_frame_equal(pooled.manifest, result.manifest)
    assert pooled.report == result.report


def crash_on_boom(paths: Sequence[str], max_pixels: int, min_side: int) -> list[dict[str, Any]]:
    """A chunk worker whose decoder 'segfaults' on files named boom*: kills its process."""
    if any(Path(path).name.startswith("boom") for path in paths):
        os._exit(11)
    return inspect_files(paths, max_pixels, min_side)


def test_a_dying_decoder_costs_only_its_file(tmp_path: Path) -> None:
    names = ["a.png", "boom.png", "c.png", "d.png"]
    for index, name in enumerate(names):
        pattern(index).save(tmp_path / name)
    paths = [str(tmp_path / name) for name in names]
    records, notes = decode._inspect_parallel(paths, 2, 50_000_000, 8, chunk_fn=crash_on_boom)
    assert [r["kind"] for r in records] == ["", "decoder_crash", "", ""]
    assert records[2]["sha256"] == hashlib.sha256((tmp_path / "c.png").read_bytes()).hexdigest()
    assert notes == ["a decoding process died; the unfinished files were redone one by one"]


def test_near_duplicate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, dtype=np.uint64)
    for index in range(0, 40, 2):  # plant close pairs
        flips = rng.choice(64, size=index % 7, replace=False)
        hashes[index + 1] = hashes[index] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    for distance in (0, 2, 4, 7, 20):
        brute = [
            (i, j, int(np.bitwise_count(hashes[i] ^ hashes[j])))
            for i in range(len(hashes))
            for j in range(i + 1, len(hashes))
            if np.bitwise_count(hashes[i] ^ hashes[j]) <= distance
        ]
        assert rules._near_duplicate_pairs(hashes, distance) == brute, distance


# --------------------------------------------------------------------------------------------
# Report, outputs, summary, drift
# --------------------------------------------------------------------------------------------


def test_report_has_the_documented_shape(result: ValidationResult) -> None:
    report = json.loads(report_json(result.report))
    summary = report["summary"]
    for key, kind in (("n_files", int), ("n_valid", int), ("n_excluded", int), ("classes", dict)):
        assert isinstance(summary[key], kind)
    assert all(isinstance(n, int) for n in summary["classes"].values())
    assert all(set(issue) == {"path", "kind", "message"} for issue in report["issues"])
    assert {issue["kind"] for issue in report["issues"]} <= set(ISSUE_KINDS)
    assert all(not issue["path"].startswith("/") for issue in report["issues"])
    assert summary["imbalance_ratio"] == 4.0
    assert isinstance(report["warnings"], list) and isinstance(report["errors"], list)


def test_outputs_are_written_and_read_back(tmp_path: Path) -> None:
    # Labels that CSV readers love to mangle: numbers and NA.
    write_class_images(tmp_path / "data", per_class=4, classes=("1", "NA", "007"))
    outcome = validate_dataset(tmp_path / "data", DATA_CFG, SERIAL)
    umask = os.umask(0o022)
    try:
        files = write_validation_outputs(outcome, tmp_path / "out")
    finally:
        os.umask(umask)
    assert set(files) == {"report", "manifest", "html"}
    # Readable by a tracking server running as another user: the umask's permissions, not 0600.
    assert {path.stat().st_mode & 0o777 for path in files.values()} == {0o644}
    assert json.loads(files["report"].read_text(encoding="utf-8")) == json.loads(report_json(outcome.report))
    pd.testing.assert_frame_equal(read_manifest(files["manifest"]), outcome.manifest)
    page = files["html"].read_text(encoding="utf-8")
    assert "<table>" in page and "007" in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.csv", "report.html", "report.json"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(VggflowError, match="cannot write the validation report"):
        write_validation_outputs(outcome, tmp_path / "a_file" / "out")


def test_summary_fits_one_screen(corpus, result: ValidationResult) -> None:
    text = format_summary(result, "out/report.json")
    assert len(text.splitlines()) <= 25
    assert "usable" in text and "20 valid" in text and "out/report.json" in text
    strict = validate_dataset(corpus[0], DATA_CFG, ValidationConfig(workers=1))
    assert "NOT USABLE" in format_summary(strict) and "birds (1)" in format_summary(strict)


def test_drift_against_the_previous_manifest(tmp_path: Path) -> None:
    write_class_images(tmp_path / "v1", per_class=10, classes=("a", "b"))
    previous = validate_dataset(tmp_path / "v1", DATA_CFG, SERIAL).manifest
    write_class_images(tmp_path / "v2", per_class=10, classes=("a", "c"))
    for index in range(30):  # class a grows, images get bigger
        pattern(500 + index, (96, 96)).save(tmp_path / "v2" / "a" / f"big_{index}.png")
    outcome = validate_dataset(tmp_path / "v2", DATA_CFG, SERIAL, previous_manifest=previous)
    drift = outcome.report["drift"]
    assert drift["new_classes"] == ["c"] and drift["missing_classes"] == ["b"]
    assert drift["class_shares"]["a"]["change"] == pytest.approx(0.3)
    warnings = "\n".join(outcome.report["warnings"])
    assert "class a share" in warnings and "median width" in warnings
    assert outcome.ok  # drift only warns
    same = validate_dataset(tmp_path / "v1", DATA_CFG, SERIAL, previous_manifest=previous)
    assert not [w for w in same.report["warnings"] if w.startswith("drift")]
    assert same.report["drift"]["n_added"] == 0 and same.report["drift"]["n_removed"] == 0


def test_docs_list_every_issue_kind_with_its_status() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "validation.md").read_text(encoding="utf-8")
    for kind, (status, _) in ISSUE_KINDS.items():
        assert f"| `{kind}` | {status} |" in docs, kind
    for column in MANIFEST_COLUMNS:
        assert f"`{column}`" in docs, column


# --------------------------------------------------------------------------------------------
# The pipeline step (tasks/validate.py), against a real Prefect server
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_step_reuses_an_unchanged_validation_and_stops_on_unusable_data(project: Path, prefect_server) -> None:
    import shutil

    from prefect import flow

    from vggflow.config import load_config

    write_class_images(project / "data", per_class=4, classes=("a", "b"))
    cfg = load_config(None, ["validation.workers=1", "validation.min_side=8", "validation.min_images_per_class=3"])
    cfg.data.dir = project / "data"

    @flow
    def validation_step():
        return validate_data(cfg)

    first = validation_step()
    assert first.ok and first.n_valid == 8 and first.class_names == ["a", "b"]
    assert first.data_version.md5 == f"untracked-{first.fingerprint}"  # no data.dvc here
    assert first.rows_file.parent.parent == (cfg.work_dir / "validation")
    assert set(first.files) == {"report", "manifest", "html"}
    written = (first.rows_file.parent / "result.json").stat().st_mtime_ns

    again = validation_step()  # same data, config, champion (none) and DVC state: reused
    assert again == first and (first.rows_file.parent / "result.json").stat().st_mtime_ns == written

    pattern(99, (24, 24)).save(project / "data" / "a" / "new.png")
    changed = validation_step()
    assert changed.rows_file.parent != first.rows_file.parent and changed.n_valid == 9
    assert changed.fingerprint != first.fingerprint

    shutil.rmtree(project / "data" / "b")
    with pytest.raises(DataError, match="NOT USABLE"):
        validation_step()

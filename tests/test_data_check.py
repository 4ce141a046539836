"""mm-data check: counts by reason with record ids, statistics, verdict; unusual modes are not flagged."""

import json

from data_fixtures import DIRTY_REASONS, dirty_dataset

from mm_plugin.data.cli import main


def test_report_on_a_dirty_set(tmp_path, capsys):
    folder = dirty_dataset()
    report_path = tmp_path / "report.json"
    code = main(["check", "--config", str(folder / "data.json"), "--workers", "2", "--quiet",
                 "--max-bad-fraction", "0.01", "--report", str(report_path)])
    assert code == 1  # not fit to train
    report = json.loads(report_path.read_text())
    expected = {}
    for rid, reason in DIRTY_REASONS.items():
        expected.setdefault(reason, []).append(rid)
    assert {reason: entry["count"] for reason, entry in report["bad_by_reason"].items()} == \
        {reason: len(ids) for reason, ids in expected.items()}
    for reason, ids in expected.items():
        firsts = report["bad_by_reason"][reason]["first"]
        assert all(any(rid in line for line in firsts) for rid in ids)
        assert report["bad_by_reason"][reason]["what_to_do"]
    assert report["records"] == 2 * len(DIRTY_REASONS) and report["valid"] == len(DIRTY_REASONS)
    assert report["fit_to_train"] is False
    # Unusual but valid images are counted as images, not as problems.
    assert {"CMYK", "I;16", "P", "RGBA", "L", "RGB"} <= set(report["images"]["modes"])
    assert report["caption_tokens"]["min"] >= 8 and report["sequence_tokens"]["max"] <= 64
    printed = capsys.readouterr().out
    assert "NOT fit to train" in printed and "missing_image" in printed and str(report_path) in printed


def test_check_without_tokenizer_still_checks_records_and_images(tmp_path):
    folder = dirty_dataset()
    code = main(["check", "--data-path", str(folder / "dirty.json"), "--data-folder", str(folder / "images"),
                 "--workers", "1", "--quiet", "--max-bad-fraction", "1", "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["caption_tokens"] is None and report["tokenizer"] is None
    # without data.json's 100x100 pixel cap, the big image is valid
    assert "decompression_bomb" not in report["bad_by_reason"] and report["bad"] == len(DIRTY_REASONS) - 1


def test_invalid_json_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"id": 1},\n {"id": 2\n]\n')
    code = main(["check", "--data-path", str(broken), "--data-folder", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{broken}: line 4, column 1" in err


def test_an_instruct_mix_is_reported_per_image_folder(tmp_path, capsys):
    """The real 665k mix misses a few hundred ocr_vqa images: the report says where, by reason."""
    import shutil

    from data_fixtures import synthetic

    folder = tmp_path / "mix"
    shutil.copytree(synthetic("instruct-mix", 300), folder)
    records = json.loads((folder / "instruct-mix.json").read_text())
    ocr = sorted({r["image"] for r in records if r.get("image", "").startswith("ocr_vqa/")})
    for path in ocr[:3]:
        (folder / "images" / path).unlink()
    missing_records = sum(1 for r in records if r.get("image") in ocr[:3])
    code = main(["check", "--config", str(folder / "data.json"), "--workers", "2", "--quiet",
                 "--max-bad-fraction", "0.5", "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0
    by_folder = report["by_image_folder"]
    assert by_folder["ocr_vqa/images"]["bad"] == {"missing_image": missing_records}
    assert all(not entry["bad"] for name, entry in by_folder.items() if name != "ocr_vqa/images")
    assert by_folder["(text-only)"]["records"] == sum(1 for r in records if "image" not in r)
    assert sum(entry["records"] for entry in by_folder.values()) == len(records)
    printed = capsys.readouterr().out
    assert "by image folder:" in printed and f"missing_image {missing_records}" in printed

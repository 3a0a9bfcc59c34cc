"""Data sources, patient-grouped splits, transforms and the cached dataset."""

import csv
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

import qing
from qing.data import (
    PATIENT_REGEX_KERMANY,
    PATIENT_REGEX_NIH,
    PATIENT_REGEX_SYNTHETIC,
    CXRDataset,
    DataConfig,
    Sample,
    build_datasets,
    build_transforms,
    collate_skip_bad,
    find_images,
    load_splits,
    make_synthetic_cxr,
    patient_from_name,
    patient_overlap,
    read_list_file,
    split_by_patient,
)
from tests.make_fake_data import write_class_folders, write_png, write_truncated_png


def _patients(samples):
    return {s.patient for s in samples}


# ---- folder layouts ---------------------------------------------------------------------------


def test_original_folder_layout_binary(tmp_path):
    write_class_folders(tmp_path / "train", {"NORMAL": 6, "PNEUMONIA": 6}, patients_per_image=2)
    write_class_folders(tmp_path / "test", {"NORMAL": 2, "PNEUMONIA": 3}, seed=1)
    splits = load_splits(DataConfig(root=str(tmp_path), val_fraction=0.34, patient_regex=PATIENT_REGEX_SYNTHETIC))
    assert splits.task == "binary"
    assert splits.label_names == ["PNEUMONIA"]  # the class that is not NORMAL is positive
    assert splits.class_names == ["NORMAL", "PNEUMONIA"]
    assert len(splits.test) == 5 and sum(s.target for s in splits.test) == 3
    assert len(splits.train) + len(splits.val) == 12
    assert not patient_overlap(splits.train, splits.val)
    assert {s.target for s in splits.val} == {0, 1}  # stratified: both classes in validation
    assert set(Counter(s.patient for s in splits.train + splits.val).values()) == {2}


def test_val_folder_used_and_multiclass(tmp_path):
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_class_folders(tmp_path / split, {"a": 2, "b": 2, "c": 2}, seed=seed)
    splits = load_splits(DataConfig(root=str(tmp_path)))
    assert splits.task == "multiclass"
    assert splits.label_names == ["a", "b", "c"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 6)
    assert sorted(s.target for s in splits.val) == [0, 0, 1, 1, 2, 2]


def test_single_folder_is_split_for_you(tmp_path):
    make_synthetic_cxr(tmp_path / "syn", train_patients_per_class=10, test_patients_per_class=0)
    root = tmp_path / "syn" / "train"  # class folders only
    splits = load_splits(DataConfig(root=str(root), patient_regex=PATIENT_REGEX_SYNTHETIC))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 40
    assert len(splits.test) == 8  # test_fraction 0.2 of 40 images, 2 per patient
    for a, b in ((splits.train, splits.val), (splits.train, splits.test), (splits.val, splits.test)):
        assert not patient_overlap(a, b)


def test_positive_class_option(tmp_path):
    write_class_folders(tmp_path / "train", {"cat": 4, "dog": 4})
    write_class_folders(tmp_path / "test", {"cat": 2, "dog": 2}, seed=1)
    splits = load_splits(DataConfig(root=str(tmp_path), positive_class="cat", val_fraction=0.25))
    assert splits.label_names == ["cat"] and splits.class_names == ["dog", "cat"]
    assert all(s.target == int(s.path.parent.name == "cat") for s in splits.train + splits.val + splits.test)
    with pytest.raises(ValueError, match=r"positive_class 'cow' is not one of the classes \['cat', 'dog'\]"):
        load_splits(DataConfig(root=str(tmp_path), positive_class="cow"))


def test_clear_errors_before_training(tmp_path):
    write_class_folders(tmp_path / "train", {"NORMAL": 3, "PNEUMONIA": 3})
    with pytest.raises(FileNotFoundError, match=r"has no test split: add test/<CLASS> folders"):
        load_splits(DataConfig(root=str(tmp_path)))

    write_class_folders(tmp_path / "test", {"NORMAL": 1, "PNEUMONIA": 1})
    (tmp_path / "train" / "EFFUSION").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) without images in .*train: EFFUSION"):
        load_splits(DataConfig(root=str(tmp_path)))

    with pytest.raises(ValueError, match=r"give exactly one data source: .* got none"):
        load_splits(DataConfig())
    with pytest.raises(FileNotFoundError, match="data root not found"):
        load_splits(DataConfig(root=str(tmp_path / "nowhere")))


def test_bad_files_skipped_and_counted_once(tmp_path):
    write_class_folders(tmp_path / "train", {"NORMAL": 4, "PNEUMONIA": 4})
    write_class_folders(tmp_path / "test", {"NORMAL": 2, "PNEUMONIA": 2}, seed=1)
    (tmp_path / "train" / "NORMAL" / "empty.png").write_bytes(b"")
    (tmp_path / "train" / "NORMAL" / "text.png").write_text("hello")
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_text("ignored: hidden")
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("ignored: not an image name")
    cut = write_truncated_png(tmp_path / "train" / "PNEUMONIA" / "cut.png")
    splits = load_splits(DataConfig(root=str(tmp_path), val_fraction=0.25))
    bad = {entry["path"]: entry["reason"] for entry in splits.bad_files.to_list()}
    assert set(bad) == {
        str(tmp_path / "train" / "NORMAL" / "empty.png"),
        str(tmp_path / "train" / "NORMAL" / "text.png"),
    }
    assert bad[str(tmp_path / "train" / "NORMAL" / "empty.png")] == "the file is empty (0 bytes)"
    assert len(splits.train) + len(splits.val) == 9  # the truncated file passes the header check

    # the truncated file fails when decoded: a marker, dropped by the collate function
    model = qing.create_model("qing_test_tr1", num_classes=1)
    tf = build_transforms(model, train=False, img_size=32)
    dataset = CXRDataset(splits.train + splits.val, task="binary", transform=tf)
    batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert [b.path for b in batch["bad"]] == [str(cut)]
    assert batch["image"].shape == (8, 3, 32, 32)

    # with verify_images the decode happens up front
    verified = load_splits(DataConfig(root=str(tmp_path), val_fraction=0.25, verify_images=True))
    assert str(cut) in verified.bad_files and len(verified.bad_files) == 3


# ---- CSV and list files -----------------------------------------------------------------------


def test_list_file_chestxray14(tmp_path):
    names = [f"{i:08d}_000.png" for i in range(3)]
    for i, name in enumerate(names):
        write_png(tmp_path / "images" / name, seed=i)
    labels = [[0] * 14, [1] + [0] * 12 + [1], [0, 1] + [0] * 12]
    lines = [f"{n} {' '.join(map(str, row))}" for n, row in zip(names, labels)]
    (tmp_path / "train.txt").write_text("# comment\n" + "\n".join(lines) + "\n\n")
    samples, label_names = read_list_file(
        tmp_path / "train.txt", image_dir=tmp_path / "images", patient_regex=PATIENT_REGEX_NIH
    )
    assert label_names[0] == "Atelectasis" and label_names[-1] == "Hernia" and len(label_names) == 14
    assert [s.target for s in samples] == [tuple(r) for r in labels]
    assert [s.patient for s in samples] == ["00000000", "00000001", "00000002"]

    (tmp_path / "bad.txt").write_text(f"{names[0]} 0 1\n{names[1]} 0 2\n")
    with pytest.raises(
        ValueError, match=r"bad\.txt:2: expected 2 labels of 0/1 after the image name, got \['0', '2'\]"
    ):
        read_list_file(tmp_path / "bad.txt", image_dir=tmp_path / "images", label_names=["a", "b"])
    (tmp_path / "missing.txt").write_text(f"{names[0]} 0 1\nnope.png 1 0\n")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) named in .*missing\.txt do not exist: .*nope\.png"):
        read_list_file(tmp_path / "missing.txt", image_dir=tmp_path / "images", label_names=["a", "b"])


def test_list_files_as_a_data_source(tmp_path):
    for i in range(12):
        write_png(tmp_path / f"{i:08d}_000.png", seed=i)
    row = lambda i: f"{i:08d}_000.png {i % 2} {(i // 2) % 2}"  # noqa: E731
    (tmp_path / "train.txt").write_text("\n".join(row(i) for i in range(8)))
    (tmp_path / "test.txt").write_text("\n".join(row(i) for i in range(8, 12)))
    cfg = DataConfig(
        train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"), label_names=["x", "y"]
    )
    splits = load_splits(cfg)
    assert splits.task == "multilabel" and splits.label_names == ["x", "y"]
    assert len(splits.test) == 4 and len(splits.train) + len(splits.val) == 8


def test_nih_csv_multilabel_with_split_column(nih_64):
    cfg = DataConfig(labels_csv=str(nih_64 / "labels.csv"), split_column="repo_split", patient_column="patient")
    splits = load_splits(cfg)
    assert splits.task == "multilabel"
    assert splits.label_names == list(qing.weights.CXR14_LABELS)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (600, 200, 200)
    with open(nih_64 / "labels.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    for sample in splits.test[:50]:
        row = rows[str(sample.path.relative_to(nih_64))]
        assert sample.target == tuple(int(row[name]) for name in splits.label_names)
        assert sample.patient == row["patient"]


def test_nih_patient_grouped_split_and_regex(nih_64):
    cfg = DataConfig(labels_csv=str(nih_64 / "labels.csv"), patient_column="patient", val_fraction=0.2, split_seed=3)
    splits = load_splits(cfg)
    sides = (splits.train, splits.val, splits.test)
    assert sum(map(len, sides)) == 1000
    for i, a in enumerate(sides):
        for b in sides[i + 1 :]:
            assert not patient_overlap(a, b)
    assert 0.15 < len(splits.test) / 1000 < 0.25 and 0.15 < len(splits.val) / (1000 - len(splits.test)) < 0.25
    # the NIH file-name regex finds the same patients as the CSV column
    assert all(int(patient_from_name(s.path, PATIENT_REGEX_NIH)) == int(s.patient) for sample in sides for s in sample)
    # an ungrouped split of the same data would put patients on both sides: the check above has teeth
    ungrouped = [Sample(s.path, s.target, None) for s in splits.train + splits.val]
    a, b = split_by_patient(ungrouped, 0.2, seed=0)
    patient = {s.path: s.patient for s in splits.train + splits.val}
    assert {patient[s.path] for s in a} & {patient[s.path] for s in b}


def test_pneumonia_manifest_patients_and_kermany_regex(pneumonia_200):
    cfg = DataConfig(
        labels_csv=str(pneumonia_200 / "manifest.csv"), label_column="label", patient_column="patient", split_seed=1
    )
    splits = load_splits(cfg)
    assert splits.task == "binary" and splits.label_names == ["PNEUMONIA"]
    every = splits.train + splits.val + splits.test
    assert len(every) == 200 and sum(s.target for s in every) == 100
    assert not patient_overlap(splits.train, splits.val) and not patient_overlap(splits.train, splits.test)
    # the Kermany file-name regex groups the images exactly as the manifest's patient column does
    by_regex = {s.path: patient_from_name(s.path, PATIENT_REGEX_KERMANY) for s in every}
    pairs = {(s.patient, by_regex[s.path]) for s in every}
    assert len(pairs) == len({p for p, _ in pairs}) == len({r for _, r in pairs})


def test_csv_errors(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,x\nb.png,y\n")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) named in .*labels\.csv do not exist: .*b\.png"):
        load_splits(DataConfig(labels_csv=str(tmp_path / "labels.csv"), label_column="label"))
    with pytest.raises(ValueError, match=r"column\(s\) \['diagnosis'\] not in .*its columns are \['path', 'label'\]"):
        load_splits(DataConfig(labels_csv=str(tmp_path / "labels.csv"), label_column="diagnosis"))


# ---- splits -----------------------------------------------------------------------------------


def test_split_by_patient_is_seeded_grouped_and_stratified():
    samples = [Sample(f"{p}_{k}.png", int(p % 3 == 0), f"p{p}") for p in range(60) for k in range(1 + p % 3)]
    rest, held = split_by_patient(samples, 0.25, seed=7)
    assert not patient_overlap(rest, held)
    assert abs(len(held) / len(samples) - 0.25) < 0.05
    rate = lambda xs: np.mean([s.target for s in xs])  # noqa: E731
    assert abs(rate(held) - rate(samples)) < 0.08
    assert split_by_patient(samples, 0.25, seed=7) == (rest, held)
    assert split_by_patient(samples, 0.25, seed=8) != (rest, held)
    with pytest.raises(ValueError, match=r"cannot split 2 images of 1 patient\(s\) with fraction 0\.5"):
        split_by_patient([Sample("a", 0, "p"), Sample("b", 1, "p")], 0.5)


# ---- transforms -------------------------------------------------------------------------------


def _image(seed=0, size=(90, 70)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_eval_transform_is_timms(tmp_path):
    model = qing.create_model("qing_test_tr1", num_classes=1)
    ours = build_transforms(model, train=False)
    assert ours.input_size == (3, 160, 160) and ours.mean == (0.485,) * 3
    timm_tf = create_transform(input_size=(3, 160, 160), interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                               mean=(0.485,) * 3, std=(0.229,) * 3, is_training=False)  # fmt: skip
    img = _image()
    assert torch.equal(ours(img), timm_tf(img))
    resized = build_transforms(model, train=False, img_size=64)(img)
    assert resized.shape == (3, 64, 64)


def test_train_transform_augments_mildly():
    model = qing.create_model("qing_test_tr1", num_classes=1)
    img = _image(1)
    plain = build_transforms(model, train=False, img_size=64)(img)
    still = build_transforms(model, train=True, img_size=64, rotation=0, translate=0, scale=(1, 1))
    assert torch.equal(still(img), plain)
    flipped = build_transforms(model, train=True, img_size=64, rotation=0, translate=0, scale=(1, 1), hflip_prob=1.0)
    assert torch.equal(flipped(img), plain.flip(-1))
    augment = build_transforms(model, train=True, img_size=64)
    assert "RandomAffine" in repr(augment.finish) and "Flip" not in repr(augment.finish)  # flips off by default
    torch.manual_seed(0)
    a = augment(img)
    assert a.shape == plain.shape and not torch.equal(a, plain)


def test_one_channel_model_transform():
    model = qing.create_model("qing_test_tr1", num_classes=1, in_chans=1)
    tf = build_transforms(model, train=False, img_size=64)
    assert tf.channels == 1 and tf.mean == (0.485,) and tf.std == (0.229,)
    gray = _image().convert("L")
    out = tf(gray)
    assert out.shape == (1, 64, 64)
    expected = (torch.from_numpy(np.array(gray.resize((64, 64), Image.BILINEAR))).float() / 255 - 0.485) / 0.229
    assert torch.allclose(out[0], expected, atol=0.02)
    model(out[None])  # runs


# ---- cached dataset ---------------------------------------------------------------------------


def test_cache_skips_decoding_and_matches_uncached(tmp_path):
    write_class_folders(tmp_path / "train", {"NORMAL": 4, "PNEUMONIA": 4}, size=64)
    write_class_folders(tmp_path / "test", {"NORMAL": 2, "PNEUMONIA": 2}, seed=1, size=64)
    splits = load_splits(DataConfig(root=str(tmp_path), val_fraction=0.25))
    model = qing.create_model("qing_test_tr1", num_classes=1)
    train_tf = build_transforms(model, train=True, img_size=32)
    eval_tf = build_transforms(model, train=False, img_size=32)
    plain = build_datasets(splits, train_transform=train_tf, eval_transform=eval_tf, cache=False)
    cached = build_datasets(splits, train_transform=train_tf, eval_transform=eval_tf, cache=True)
    assert cached["train"].cache_bytes == len(splits.train) * 32 * 32 * 3
    expected_test = [plain["test"][i]["image"] for i in range(len(splits.test))]
    torch.manual_seed(5)
    expected_train = plain["train"][0]["image"]
    for path in tmp_path.rglob("*.png"):  # the cache holds every image: the files are not needed any more
        path.unlink()
    with pytest.raises(FileNotFoundError):
        plain["test"][0]
    for i, expected in enumerate(expected_test):
        assert torch.equal(cached["test"][i]["image"], expected)
    torch.manual_seed(5)
    assert torch.equal(cached["train"][0]["image"], expected_train)  # same augmentation from the cached image


def test_find_images_recursive_sorted_without_hidden_or_other_files(tmp_path):
    for rel in ["b/2.png", "b/1.JPG", "a.dcm", "a/c/3.jpeg", ".hidden/4.png", "b/.5.png", "notes.txt", "b/6.csv"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "d").mkdir(parents=True, exist_ok=True)
    (outside / "d" / "7.png").write_bytes(b"")
    (tmp_path / "linked").symlink_to(tmp_path / "a", target_is_directory=True)  # a is walked already: once only
    (tmp_path / "more").symlink_to(outside, target_is_directory=True)  # a folder elsewhere: followed
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.dcm", "a/c/3.jpeg", "b/1.JPG", "b/2.png", "more/d/7.png"]
    assert find_images(tmp_path / "missing") == []


# ---- data options a new user reaches for (issue 13 item 7) ----------------------------------------------


def _nih_native_csv(nih_64, path, rows):
    """The shared NIH labels as NIH publishes them (Data_Entry_2017.csv's column names)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"])
        for r in rows:
            writer.writerow([r["path"], r["finding_labels"], "0", r["patient"], r["view"]])


def test_nih_finding_labels_column_is_a_multilabel_source(tmp_path, nih_64):
    with open(nih_64 / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"No Finding", "Atelectasis|Effusion"} <= {r["finding_labels"] for r in rows}
    native = tmp_path / "Data_Entry_2017.csv"
    _nih_native_csv(nih_64, native, rows)
    cfg = DataConfig(
        labels_csv=str(native),
        image_dir=str(nih_64),
        path_column="Image Index",
        label_column="Finding Labels",  # detected as |-separated findings by its name and values
        patient_column="Patient ID",
        test_fraction=0.2,
    )
    splits = load_splits(cfg)
    assert splits.task == "multilabel" and splits.label_names == list(qing.weights.CXR14_LABELS)
    by_path = {str(nih_64 / r["path"]): tuple(int(r[n]) for n in splits.label_names) for r in rows}
    samples = splits.train + splits.val + splits.test
    assert len(samples) == len(rows)
    assert all(s.target == by_path[str(s.path)] for s in samples)  # equal to the 0/1 columns, No Finding = zeros
    assert sum(1 for s in samples if not any(s.target)) == sum(r["finding_labels"] == "No Finding" for r in rows)


def test_separated_findings_with_an_explicit_separator_and_label_names(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("path,findings\na.png,Mass;Nodule\nb.png,Normal\nc.png,Nodule\n")
    rows, names = qing.data.read_label_csv(
        tmp_path / "labels.csv", label_column="findings", label_separator=";", label_names=["Nodule", "Mass", "Edema"]
    )
    assert names == ["Nodule", "Mass", "Edema"] and [r.labels for r in rows] == [(1, 1, 0), (0, 0, 0), (1, 0, 0)]
    (tmp_path / "bad.csv").write_text("path,findings\na.png,No Finding|Mass\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: 'No Finding' together with findings in 'No Finding\|Mass'"):
        qing.data.read_label_csv(tmp_path / "bad.csv", label_column="findings")


def test_patient_regex_accepts_the_names_the_help_gives(tmp_path):
    assert DataConfig(root="x", patient_regex="PATIENT_REGEX_NIH").patient_regex == PATIENT_REGEX_NIH
    assert DataConfig(root="x", patient_regex="kermany").patient_regex == PATIENT_REGEX_KERMANY
    assert DataConfig(root="x", patient_regex="Synthetic").patient_regex == PATIENT_REGEX_SYNTHETIC
    assert DataConfig(root="x", patient_regex=r"^(\w+)-").patient_regex == r"^(\w+)-"
    with pytest.raises(ValueError, match=r"patient_regex '\(oops' is not a regular expression .* PATIENT_REGEX_NIH"):
        DataConfig(root="x", patient_regex="(oops")

    make_synthetic_cxr(tmp_path / "data", train_patients_per_class=4, test_patients_per_class=2, size=32)
    splits = load_splits(DataConfig(root=str(tmp_path / "data"), patient_regex="synthetic"))
    assert len(_patients(splits.train + splits.val)) == 8 and not patient_overlap(splits.train, splits.val)

    from qing.cli import build_parser  # the flag's help is generated from the DataConfig docstring

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "or the name of a known one: nih (00000005_001.png -> 00000005), kermany" in help_text


def test_root_that_is_a_file_says_which_field_to_use(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(ValueError) as error:
        load_splits(DataConfig(root=str(tmp_path / "labels.csv")))
    assert str(error.value) == (
        f"root is a file, not a folder of class folders: {tmp_path / 'labels.csv'}; "
        f"use labels_csv={str(tmp_path / 'labels.csv')!r}"
    )


@pytest.mark.parametrize(("crop_mode", "crop_pct"), [("squash", 1.0), ("center", 0.875), ("border", 1.0)])
def test_source_box_inverts_the_eval_transform(crop_mode, crop_pct):
    """A bright square lands where ``source_box`` says, within a pixel, for each of timm's crop modes."""
    cfg = {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": crop_mode}
    transform = build_transforms({**cfg, "crop_pct": crop_pct, "interpolation": "bilinear"}, train=False)
    width, height = 300, 200
    left, top, right, bottom = transform.source_box(width, height)
    for x, y in [(150, 100), (120, 60), (200, 150)]:
        pixels = np.zeros((height, width), dtype=np.uint8)
        pixels[y - 10 : y + 10, x - 10 : x + 10] = 255
        out = np.asarray(transform.prepare(Image.fromarray(pixels).convert("RGB")))[..., 0]
        rows, cols = np.nonzero(out > 200)
        assert abs(cols.mean() + 0.5 - (x - left) / (right - left) * 64) <= 1.0
        assert abs(rows.mean() + 0.5 - (y - top) / (bottom - top) * 64) <= 1.0

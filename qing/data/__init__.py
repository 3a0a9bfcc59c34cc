"""Chest X-ray data: image reading (PNG/JPEG/16-bit/DICOM), datasets, splits and transforms.

Data flows one way: files -> :func:`load_splits` (samples, checked, split by patient) ->
:func:`build_transforms` (from the model's pretrained cfg) -> :func:`build_datasets` -> DataLoader.
"""

from qing.data.builders import (
    PATIENT_REGEXES,
    DataConfig,
    DataSplits,
    build_datasets,
    load_splits,
    resolve_patient_regex,
)
from qing.data.dataset import BadFileLog, BadImage, CXRDataset, ImageFiles, collate_skip_bad, encode_targets
from qing.data.image_io import (
    DICOM_TRANSFER_SYNTAXES,
    DicomTransferSyntax,
    FolderScan,
    ImageLoadError,
    check_image_header,
    dicom_decoder_problem,
    find_images,
    is_dicom,
    is_image_file,
    load_image,
    scan_folder,
)
from qing.data.samples import (
    NEGATIVE_CLASS_NAMES,
    NIH_FINDINGS_COLUMN,
    PATIENT_REGEX_KERMANY,
    PATIENT_REGEX_NIH,
    Sample,
    patient_from_name,
    read_class_folders,
    read_label_csv,
    read_list_file,
)
from qing.data.splits import patient_overlap, split_by_patient
from qing.data.synthetic import PATIENT_REGEX_SYNTHETIC, SYNTHETIC_CLASSES, make_synthetic_cxr, synthetic_cxr_image
from qing.data.transforms import ImageTransform, build_transforms, resolve_image_config

__all__ = [
    "DICOM_TRANSFER_SYNTAXES",
    "NEGATIVE_CLASS_NAMES",
    "NIH_FINDINGS_COLUMN",
    "PATIENT_REGEXES",
    "PATIENT_REGEX_KERMANY",
    "PATIENT_REGEX_NIH",
    "PATIENT_REGEX_SYNTHETIC",
    "SYNTHETIC_CLASSES",
    "BadFileLog",
    "BadImage",
    "CXRDataset",
    "DataConfig",
    "DataSplits",
    "DicomTransferSyntax",
    "FolderScan",
    "ImageFiles",
    "ImageLoadError",
    "ImageTransform",
    "Sample",
    "build_datasets",
    "build_transforms",
    "check_image_header",
    "collate_skip_bad",
    "dicom_decoder_problem",
    "encode_targets",
    "find_images",
    "is_dicom",
    "is_image_file",
    "load_image",
    "load_splits",
    "make_synthetic_cxr",
    "patient_from_name",
    "patient_overlap",
    "read_class_folders",
    "read_label_csv",
    "read_list_file",
    "resolve_image_config",
    "resolve_patient_regex",
    "scan_folder",
    "split_by_patient",
    "synthetic_cxr_image",
]

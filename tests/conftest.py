"""Shared offline fixtures: one tiny random LLaVA + ScienceQA-IMG-shaped data per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """Paths of the tiny model folder, the parquet split and the task folder."""
    from lmms_simignore.testbed.tiny import build_offline_testbed

    return build_offline_testbed(tmp_path_factory.mktemp("testbed"), num_docs=12, seed=0)


@pytest.fixture(scope="session")
def tiny_model(testbed):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(testbed["model"]).eval()


@pytest.fixture(scope="session")
def processor(testbed):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(testbed["model"])
    processor.tokenizer.padding_side = "left"
    return processor


@pytest.fixture(scope="session")
def qwen_folders(tmp_path_factory):
    """One tiny random checkpoint of each Qwen-VL family (transformers' own classes and processors)."""
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processors need it")
    from lmms_simignore.testbed.tiny_qwen import FAMILIES, build_tiny_qwen

    root = tmp_path_factory.mktemp("tiny_qwen_models")
    return {family: build_tiny_qwen(root / family, family) for family in FAMILIES}

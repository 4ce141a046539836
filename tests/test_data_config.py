"""data.json: MindSpeed-MM's published LLaVA-1.5 files load unchanged apart from their paths."""

import json

import pytest

from mm_plugin.data.config import DataConfig, load_data_config
from mm_plugin.data.errors import DataError

PUBLISHED_2_3_0 = {  # MindSpeed-MM ad5859af examples/llava1.5/data.json, paths replaced
    "dataset_param": {
        "dataset_type": "multimodal",
        "basic_parameters": {"data_path": "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                             "data_folder": "LLaVA-Pretrain/images/"},
        "preprocess_parameters": {
            "image_reader_type": "CLIPImageProcessor",
            "train_pipeline": {
                "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
                "do_normalize": True, "do_rescale": True, "do_resize": True, "pad2square": False,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}},
        "tokenizer_config": {"hub_backend": "hf", "autotokenizer_name": "AutoTokenizer",
                             "from_pretrained": "/weights/vicuna-7b-v1.5", "cache_dir": None,
                             "padding_side": "right", "use_fast": False},
        "use_text_processer": True, "template_name": "llava-plain", "mm_use_im_start_end": False},
    "dataloader_param": {
        "dataloader_mode": "sampler", "shuffle": True, "drop_last": True, "pin_memory": True,
        "sampler_type": "BaseRandomBatchSampler", "collate_param": {"model_name": "llava", "pad_token_id": 0}},
}


def _rc3():
    """MindSpeed-MM 1.0.RC3's version: older field set, model_max_length in two places."""
    config = json.loads(json.dumps(PUBLISHED_2_3_0))
    dataset = config["dataset_param"]
    dataset["dataset_type"] = "image"
    dataset["preprocess_parameters"]["image_processer_type"] = "image2pixel"
    dataset["tokenizer_config"]["model_max_length"] = 2048
    config["dataloader_param"].update(batch_size=8, num_workers=8, shuffle=False)
    config["dataloader_param"]["collate_param"]["model_max_length"] = 2048
    return config


@pytest.mark.parametrize("published,max_length,shuffle", [(PUBLISHED_2_3_0, None, True), (_rc3(), 2048, False)])
def test_published_data_json_loads(tmp_path, published, max_length, shuffle):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(published))
    config = load_data_config(path)
    assert config.template == "plain"
    assert config.data_path == str(tmp_path / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json")  # relative to data.json
    assert config.tokenizer_path == "/weights/vicuna-7b-v1.5"
    assert config.model_max_length == max_length and config.shuffle is shuffle
    assert config.pad_token_id == 0
    image = config.image
    assert (image.shortest_edge, image.crop_height, image.crop_width, image.resample) == (336, 336, 336, 3)
    assert image.pad_to_square is False and image.exif_transpose is False


def _pipeline(config: dict) -> dict:
    return config["dataset_param"]["preprocess_parameters"]["train_pipeline"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["dataset_param"]["basic_parameters"].update(data_pth="x"), "unknown field.*data_pth"),
    (lambda c: c["dataset_param"].update(template_name="chatml"), "template_name 'chatml'"),
    (lambda c: c["dataset_param"]["basic_parameters"].pop("data_folder"), "data_folder is required"),
    (lambda c: c["dataset_param"].update(mm_use_im_start_end=True), "mm_use_im_start_end"),
    (lambda c: c["dataset_param"]["preprocess_parameters"].update(image_reader_type="Qwen"), "image_reader_type"),
    (lambda c: _pipeline(c).update(image_std=[0.27, 0, 0.28]), "image_std must be positive"),  # NaN losses
    (lambda c: _pipeline(c).update(image_mean=[0.5, float("nan"), 0.5]), "image_mean finite"),
    (lambda c: _pipeline(c).update(resample=99), "resample 99 is not a Pillow filter"),  # every record bad
    (lambda c: _pipeline(c).update(crop_size={"height": 0, "width": 336}), "crop_height must be a whole number"),
])
def test_config_errors_name_the_file_and_field(tmp_path, edit, message):
    config = json.loads(json.dumps(PUBLISHED_2_3_0))
    edit(config)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(config))
    with pytest.raises(DataError, match=message) as caught:
        load_data_config(path)
    assert str(path) in str(caught.value)


def test_invalid_json_config_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{\n  "dataset_param": {\n    "template_name": "plain",,\n  }\n}\n')
    with pytest.raises(DataError, match=r"data.json: line 3, column"):
        load_data_config(path)


def test_template_aliases():
    assert DataConfig("a.json", "images", template="llava-plain").template == "plain"
    assert DataConfig("a.json", "images", template="vicuna_v1").template == "vicuna_v1"

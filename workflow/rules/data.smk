# Data sets: results/data/{val,calib,train}.json (COCO instances; images[].file_name
# relative to the working directory). Demo images sit beside them in results/data/{split}/.

DATA = RESULTS / "data"
DEMO_DATA = config["data"]["source"] == "demo"
# The user's calibration images (folder, glob or COCO JSON); unset: demo calib split, else val.
CALIBRATION_IMAGES = config.get("calibration", {}).get("images")


rule data:
    input:
        script_code("make_data"),
        # the user's annotations, so that editing them reruns `data`
        [] if DEMO_DATA or not config["data"]["annotations"] else config["data"]["annotations"],
    output:
        val=DATA / "val.json",
        calib=DATA / "calib.json",
        demo_images=[
            directory(DATA / split)
            for split in ("val", "calib")
            if DEMO_DATA and not (split == "calib" and CALIBRATION_IMAGES)
        ],
    params:
        data={key: value for key, value in config_section("data").items() if key != "demo"},
        # num_train is left out: it only feeds data_train and must not rerun val/calib
        demo={key: value for key, value in config_section("data", "demo").items() if key != "num_train"},
        calibration_images=CALIBRATION_IMAGES,
    conda:
        ENV
    log:
        LOGS / "data/data.log",
    script:
        "../scripts/make_data.py"


rule data_train:
    input:
        script_code("make_demo_train"),
    output:
        train=DATA / "train.json",
        images=directory(DATA / "train"),
    params:
        seed=config_section("data", "demo", "seed"),
        num_train=config_section("data", "demo", "num_train"),
    conda:
        ENV
    log:
        LOGS / "data_train/data_train.log",
    script:
        "../scripts/make_demo_train.py"

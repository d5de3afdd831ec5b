# Stage `plugins`: nvcc compiles plugins/*.cu (beside the Snakefile) into the plugin library (fat binary + PTX), the
# PTX the ahead-of-time TensorRT plugin embeds, and build.json. Editing a .cu or .h reruns it.


rule plugins:
    input:
        sources=sorted(PLUGIN_SOURCES.glob("*.cu")) + sorted(PLUGIN_SOURCES.glob("*.h")),
        code=script_code("build_plugins"),
    output:
        library=RESULTS / "plugins/libtrtflow_plugins.so",
        ptx=RESULTS / "plugins/multilevel_roi_align.ptx",
        record=RESULTS / "plugins/build.json",
    params:
        plugins=config_section("plugins"),
    conda:
        ENV
    log:
        LOGS / "plugins/build.log",
    script:
        "../scripts/build_plugins.py"

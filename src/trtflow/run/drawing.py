"""The colours boxes are drawn in, shared by the report's figures (matplotlib takes "#rrggbb") and the images
`trtflow detect --draw` writes (OpenCV takes blue, green, red): a deployed box looks the same in both."""

REFERENCE_COLOR = "#1a9850"  # green: the reference's boxes
DEPLOYED_COLOR = "#d73027"  # red: the deployed plan's boxes


def bgr(color: str) -> tuple[int, int, int]:
    """A "#rrggbb" colour as OpenCV's (blue, green, red)."""
    return tuple(int(color[start : start + 2], 16) for start in (5, 3, 1))

"""The run's pictures: the gallery puts the images with the fewest blocks first, each captioned."""

import matplotlib.pyplot as plt
import numpy as np

from experiments.figures import path_gallery


def test_the_gallery_shows_the_fewest_then_the_most_blocks_each_captioned():
    n, h, w = 6, 8, 8
    images = np.stack([np.full((1, h, w), 10 * i, dtype=np.uint8) for i in range(n)])  # image i is all 10 * i
    blocks = np.array([5, 1, 4, 0, 3, 2])
    correct = np.array([True, True, False, True, True, True])
    fig = path_gallery(images, blocks, np.arange(n), correct, per_side=2)
    (ax,) = fig.axes
    canvas = np.asarray(ax.images[0].get_array())
    band, gap = h // 2, w // 8
    first = canvas[band : band + h, :w]  # first tile of the top row: the fewest blocks (image 3, 0 blocks)
    second = canvas[band : band + h, w + gap : 2 * w + gap]
    most = canvas[2 * band + h : 2 * (band + h), :w]  # first of the bottom row: the most blocks (image 0)
    assert (first == 30).all() and (second == 10).all() and (most == 0).all()
    captions = [t.get_text() for t in ax.texts]
    assert captions == ["3 | 0", "1 | 1", "0 | 5", "2 | 4 x"]
    plt.close(fig)


def test_a_runs_figures_are_drawn_once_and_tensorboard_shows_the_saved_files(tmp_path):
    import torch

    from agents.evaluate import EvalResult
    from backbones.data import ImageTensors
    from experiments.report import write_figures

    n, blocks = 12, 4
    rng = np.random.default_rng(0)
    executed = rng.random((n, blocks)) < 0.5
    labels = np.arange(n) % 3
    result = EvalResult(0.5, 1.0, 0.5, 0.5, 0.0, 2.0, 50.0, [0.5] * blocks, n, 0.0, per_image={
        "executed": executed, "label": labels, "correct": rng.random(n) < 0.5, "cross_entropy": np.ones(n)
    })  # fmt: skip
    data = ImageTensors(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.from_numpy(labels), 3, (0.5,), (0.25,), "t")

    class Writer:
        images: dict = {}

        def add_image(self, tag, image, step, dataformats):
            self.images[tag] = (image, dataformats)

    writer = Writer()
    write_figures(tmp_path, writer, result, data)
    assert set(writer.images) == {"eval/heatmap", "eval/gallery"}
    for name in ("heatmap", "gallery"):
        image, layout = writer.images[f"eval/{name}"]
        assert layout == "HWC" and np.array_equal(image, plt.imread(tmp_path / f"{name}.png")[..., :3])

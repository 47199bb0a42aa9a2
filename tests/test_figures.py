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

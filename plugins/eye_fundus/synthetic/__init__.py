"""Procedural generator of fundus-like colour photographs (the plugin's embedded dataset).

The eye_fundus plugin reproduces "Multi-Task Knowledge Distillation for Eye Disease
Prediction" (WACV 2021), whose data set is private.  So that the plugin runs with no
download, this module draws synthetic retinal photographs together with the three
targets of the paper:

* T1 - broad disease, one of :data:`BROAD_CLASSES`;
* T2 - a fine sub-category ("DR | proliferative | with macular edema | right"): the
  sub-type, severity, location and eye of the finding, see :func:`fine_label_catalogue`;
* T3 - an ophthalmologist-style diagnosis sentence produced by a small grammar that is
  tied to the fine label ("proliferative diabetic retinopathy with macular edema of
  the right eye").

Every image is a pure function of ``(seed, patient index, image index)``: each image
seeds its own ``np.random.default_rng`` and never touches global random state, so a
data set is identical on every machine and for any number of worker processes, and
growing ``num_patients`` only appends images.  Drawing is vectorised with numpy
(lesions are splatted as batches of Gaussian or disc stamps, vessels are drawn with
Pillow at twice the resolution), which keeps generation at a few milliseconds per
128 px image.  See ``docs/synthetic_data.md`` for pictures and the measured difficulty.
"""

from eye_fundus.synthetic.catalogue import BROAD_CLASSES, FineClass, fine_label_catalogue
from eye_fundus.synthetic.dataset import SyntheticFundus, generate_fundus
from eye_fundus.synthetic.grammar import diagnosis_text
from eye_fundus.synthetic.grid import write_example_grid

#: bumped whenever the drawing or the labels change, so that cached data sets are rebuilt
GENERATOR_VERSION = "1"

__all__ = [
    "BROAD_CLASSES",
    "FineClass",
    "GENERATOR_VERSION",
    "SyntheticFundus",
    "diagnosis_text",
    "fine_label_catalogue",
    "generate_fundus",
    "write_example_grid",
]

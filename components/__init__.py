"""KFP components, one folder per pipeline stage. Each is a thin `@dsl.component` around
`gpt2core.stages.<stage>.run`; the shared plumbing lives in `components.runtime` (imported inside
the component functions, so it runs in whichever container or process executes the step).

The container image is a setting, resolved by `gpt2core.images.image_for` when this package is
imported (i.e. when a pipeline is built or compiled): `GPT2OPS_IMAGE_CPU`, then the local build
record `containers/images.json`, then the default tag `gpt2ops-cpu:<version>`. The pipeline swaps in
the cuda and cerebras images on the steps of those branches.
"""

from gpt2core.images import image_for

IMAGE = image_for("cpu")

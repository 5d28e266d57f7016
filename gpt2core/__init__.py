"""gpt2ops core library: everything a pipeline stage does, without Kubeflow.

Stages live in :mod:`gpt2core.stages`; each is a plain function of (config, input URIs) ->
(output URIs, metrics) that the CLI, the KFP components and the tests all call.
"""

__version__ = "0.1.0"

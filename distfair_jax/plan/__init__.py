"""Planning a training run before renting the devices.

``memory`` (the memory plan of a config on a mesh: state sizes and the compiled train step's memory
analysis) and ``tpu_slice`` (the same step compiled for a TPU pod slice by libtpu). The chip table
they read, ``distfair_jax.tpu``, is a foundation that ``train.flops`` reads too.
"""

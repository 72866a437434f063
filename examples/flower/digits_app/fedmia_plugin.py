"""fedmia plugin: the app's model, known to the auditor as model kind ``digits_cnn``.

The audit config lists it (``plugins: [examples.flower.digits_app.fedmia_plugin]``); it
imports no torch (the workflow imports it when it parses the config) and names the
model's factory by a dotted path.
"""

from fedmia.federation.models import MODELS

MODELS.register(
    "digits_cnn",
    impl=f"{__package__}.task:net",
    samples_per_s={"gpu": 50_000, "cpu": 3_000},
    parameters=65_962,
)

"""btc: brain tumour MRI classification, from data to a served, monitored model."""

__version__ = "0.1.0"

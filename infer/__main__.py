"""``python -m idc_infer`` runs idc-infer."""

from .cli import main

main()

"""Generative models of crystals (``model.name: cdvae``): the model (:mod:`.model`), its
score decoder (:mod:`.decoder`), lattice helpers (:mod:`.lattice`), training objective
(:mod:`.objective`) and Ray Train loop (:mod:`.train`), sampling (:mod:`.sampling`),
checkpoints (:mod:`.checkpoint`), split reading (:mod:`.data`) and CDVAE's metrics
(:mod:`.metrics`). Commands: ``matsci-ray train`` (a generative config), ``generate``,
``reconstruct``.
"""

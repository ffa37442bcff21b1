"""nnU-Net v2 model folders (``models.families`` family ``nnunet``).

Any nnU-Net v2 results folder ``DatasetXXX_Name/<trainer>__<plans>__<configuration>/`` (with
``dataset.json``, ``plans.json`` and ``fold_*/checkpoint_*.pth``) runs through our engine:

* ``folder``      read and check the folder (dataset.json, plans.json, folds), unpack zips;
* ``network``     build the network the plans describe (``dynamic_network_architectures``),
                  load each fold's weights with ``weights_only=True``;
* ``pipeline``    nnU-Net v2 preprocessing and export on torch (reader layout, transpose,
                  crop, normalisation, resampling, logits export, labels and regions);
* ``family``      the family hooks (cards from ``nnunet:<path>``, TotalSegmentator's parts);
* ``importing``   ``uniseg weights import nnunet PATH --name NAME``.

nnunetv2 itself is never imported here; its source (MIC-DKFZ/nnUNet, v2.8.1) is the
reference the modules cite.
"""

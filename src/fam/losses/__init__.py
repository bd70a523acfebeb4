"""Loss functions: pure functions of tensors (embeddings, token states, masks).

No model names, token ids or tokenizers in here; each returns a dict of named terms.
"""
from fam.losses.contrastive import info_nce
from fam.losses.maxsim import late_interaction_nce, maxsim, maxsim_reference
from fam.losses.mac import mac_loss, mac_loss_from_pooled, mac_pool
from fam.losses.patch import beta_schedule, patch_alignment_loss, projector_loss
from fam.losses.vein import VeinDecoder, VeinHead, vein_eligible

__all__ = ["info_nce", "mac_loss", "mac_pool", "mac_loss_from_pooled", "VeinDecoder", "VeinHead",
           "vein_eligible", "maxsim", "maxsim_reference", "late_interaction_nce", "patch_alignment_loss", "beta_schedule", "projector_loss"]

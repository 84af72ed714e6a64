"""The merged model's tokenizer: vocabulary union, configured tokens and the chat template.

- :mod:`~dammerge.vocabulary.settings`: the recipe's ``tokenizer:`` block;
- :mod:`~dammerge.vocabulary.build`: the output tokenizer and each model's ids in it;
- :mod:`~dammerge.vocabulary.rows`: each model's embedding and ``lm_head`` rows rebuilt in the
  output vocabulary before the merge method runs;
- :mod:`~dammerge.vocabulary.chat`: the recipe's ``chat_template``;
- :mod:`~dammerge.vocabulary.output`: writing the tokenizer files beside the merged weights.
"""

from dammerge.vocabulary.settings import TokenizerSettings, tokenizer_settings

__all__ = ["TokenizerSettings", "tokenizer_settings"]

"""BERT for sequence classification from the mean of its last layer: the head hvdbert.finetune gives a
BERT encoder that masked LM alone pretrained.

transformers' BertForSequenceClassification classifies from [CLS] through the pooler, and an MLM-only
encoder has trained neither (nothing masks [CLS]; BertForMaskedLM has no pooler). This model averages
the last layer over the non-padding tokens, which masked LM trains at every position, and classifies
that (config.classifier_pooling = "mean", as ModernBertForSequenceClassification names it).

This file imports torch and transformers only: save_pretrained copies it beside the weights and names
it in config.json's auto_map, so that `AutoModelForSequenceClassification.from_pretrained(DIR,
trust_remote_code=True)` loads the model without hvdbert installed.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BertMeanPooledForSequenceClassification(BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        config.classifier_pooling = "mean"
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)  # the parameter names BertForMaskedLM saves
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           position_ids=position_ids, inputs_embeds=inputs_embeds).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


BertMeanPooledForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

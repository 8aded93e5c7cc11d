// FFI handler symbol of the expert forward (registered as "ktjax_moe_forward"); its arguments and
// results are in moe_contract.h.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxMoeForward);

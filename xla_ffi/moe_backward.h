// FFI handler symbol of the expert backward (registered as "ktjax_moe_backward"); its arguments,
// results and `needs` bits are in moe_contract.h.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxMoeBackward);

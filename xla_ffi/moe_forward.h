// FFI handler symbol of the expert forward (registered as "ktjax_moe_forward").
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(KtjaxMoeForward);

/*
 * ABI bridge between ExecuTorch 1.5.1 (built against QNN 2.37 headers) and QNN >= 2.47 HTP
 * libraries.
 *
 * Why: in QNN >= 2.47 the union inside QnnHtpDevice_CustomConfig_t gained a pointer member, so
 * the union moved from byte offset 4 to byte offset 8. ExecuTorch writes
 * {option, socModel} with the value at offset 4; QNN 2.51 reads offset 8, finds 0, and device
 * creation fails ("unknown custom config socModel 0", error 14001) for every SoC.
 *
 * How: this library is installed as the libQnnHtp.so that ExecuTorch dlopens. It dlopens the
 * real HTP library (path in QUANTNPU_QNN_HTP_REAL), forwards QnnInterface_getProviders, and hands
 * out copies of each provider whose deviceCreate is replaced by a wrapper that rewrites every
 * custom device config into the new layout before calling the real deviceCreate.
 *
 * Layout facts used (QNN public headers, x86-64):
 *   QnnInterface_t   = { uint32 backendId; const char* providerName; Qnn_ApiVersion_t (6 x uint32);
 *                        function table }                  -> table at byte 40
 *   deviceCreate     = function-pointer slot 40 of that table
 *   QnnDevice_Config_t = { int32 option; union { void* customConfig; ... } }  (option CUSTOM == 0)
 *   QnnHtpDevice_CustomConfig_t: old = { int32 option; union (8 bytes) at 4 },
 *                                new = { int32 option; union at 8 }
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INTERFACE_TABLE_OFFSET 40
#define DEVICE_CREATE_SLOT 40
#define MAX_TABLE_SLOTS 512
#define DEVICE_CONFIG_OPTION_CUSTOM 0
#define OLD_UNION_OFFSET 4
#define NEW_UNION_OFFSET 8
#define OLD_UNION_SIZE 8
#define NEW_CUSTOM_CONFIG_SIZE 64
#define MAX_PROVIDERS 16

typedef uint64_t QnnErrorHandle;
typedef QnnErrorHandle (*GetProvidersFn)(const void ***providers, uint32_t *count);
typedef QnnErrorHandle (*DeviceCreateFn)(void *logger, const void **configs, void *device);

typedef struct {
    int32_t option;
    void *custom_config;
} DeviceConfig;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static QnnErrorHandle g_init_error = 0;
static const void *g_patched[MAX_PROVIDERS];
static uint32_t g_count = 0;
static DeviceCreateFn g_real_device_create[MAX_PROVIDERS];

/* One wrapper per provider slot, since a plain C function pointer carries no closure. */
static QnnErrorHandle device_create_for(int provider, void *logger, const void **configs,
                                        void *device) {
    if (configs == NULL) return g_real_device_create[provider](logger, configs, device);
    size_t n = 0;
    while (configs[n] != NULL) n++;
    const void **rewritten = calloc(n + 1, sizeof(void *));
    if (rewritten == NULL) return 1;
    for (size_t i = 0; i < n; i++) {
        const DeviceConfig *config = configs[i];
        rewritten[i] = config;
        if (config->option != DEVICE_CONFIG_OPTION_CUSTOM || config->custom_config == NULL) continue;
        DeviceConfig *copy = calloc(1, sizeof(DeviceConfig));
        unsigned char *custom = calloc(1, NEW_CUSTOM_CONFIG_SIZE);
        if (copy == NULL || custom == NULL) return 1;
        const unsigned char *old = config->custom_config;
        memcpy(custom, old, sizeof(int32_t));
        memcpy(custom + NEW_UNION_OFFSET, old + OLD_UNION_OFFSET, OLD_UNION_SIZE);
        copy->option = config->option;
        copy->custom_config = custom;
        rewritten[i] = copy;
    }
    /* The rewritten configs are deliberately not freed: QNN documents no lifetime for config
     * pointers, a device is created a handful of times per process, and a leak of a few dozen
     * bytes is safer than a use-after-free inside the backend. */
    return g_real_device_create[provider](logger, rewritten, device);
}

#define WRAPPER(i)                                                                            \
    static QnnErrorHandle device_create_##i(void *l, const void **c, void *d) {              \
        return device_create_for(i, l, c, d);                                                  \
    }
WRAPPER(0) WRAPPER(1) WRAPPER(2) WRAPPER(3) WRAPPER(4) WRAPPER(5) WRAPPER(6) WRAPPER(7)
WRAPPER(8) WRAPPER(9) WRAPPER(10) WRAPPER(11) WRAPPER(12) WRAPPER(13) WRAPPER(14) WRAPPER(15)
static const DeviceCreateFn g_wrappers[MAX_PROVIDERS] = {
    device_create_0,  device_create_1,  device_create_2,  device_create_3,
    device_create_4,  device_create_5,  device_create_6,  device_create_7,
    device_create_8,  device_create_9,  device_create_10, device_create_11,
    device_create_12, device_create_13, device_create_14, device_create_15};

/* Number of leading table slots that are NULL or point into the real library: the table's
 * length is not stored anywhere, and it grows with every QNN release. */
static size_t table_slots(const unsigned char *provider, const void *real_base) {
    const uintptr_t *slots = (const uintptr_t *)(provider + INTERFACE_TABLE_OFFSET);
    size_t n = 0;
    for (; n < MAX_TABLE_SLOTS; n++) {
        if (slots[n] == 0) continue;
        Dl_info info;
        if (dladdr((void *)slots[n], &info) == 0 || info.dli_fbase != real_base) break;
    }
    return n;
}

static void initialize(void) {
    const char *real_path = getenv("QUANTNPU_QNN_HTP_REAL");
    if (real_path == NULL || real_path[0] == '\0') {
        fprintf(stderr, "quantnpu QNN bridge: QUANTNPU_QNN_HTP_REAL is not set\n");
        g_init_error = 1;
        return;
    }
    void *real = dlopen(real_path, RTLD_NOW | RTLD_LOCAL);
    if (real == NULL) {
        fprintf(stderr, "quantnpu QNN bridge: cannot load %s: %s\n", real_path, dlerror());
        g_init_error = 1;
        return;
    }
    GetProvidersFn get_providers = (GetProvidersFn)dlsym(real, "QnnInterface_getProviders");
    Dl_info real_info;
    if (get_providers == NULL || dladdr((void *)get_providers, &real_info) == 0) {
        fprintf(stderr, "quantnpu QNN bridge: %s has no QnnInterface_getProviders\n", real_path);
        g_init_error = 1;
        return;
    }
    const void **providers = NULL;
    uint32_t count = 0;
    QnnErrorHandle error = get_providers(&providers, &count);
    if (error != 0) {
        g_init_error = error;
        return;
    }
    if (count > MAX_PROVIDERS) count = MAX_PROVIDERS;
    for (uint32_t p = 0; p < count; p++) {
        const unsigned char *provider = providers[p];
        size_t slots = table_slots(provider, real_info.dli_fbase);
        if (slots <= DEVICE_CREATE_SLOT) {
            fprintf(stderr, "quantnpu QNN bridge: provider %u has only %zu interface slots\n", p,
                    slots);
            g_init_error = 1;
            return;
        }
        /* Zero-padded to the largest table this bridge knows, so a caller built against a
         * longer table reads NULL, never bytes beyond the real provider. */
        unsigned char *copy = calloc(1, INTERFACE_TABLE_OFFSET + MAX_TABLE_SLOTS * sizeof(void *));
        if (copy == NULL) {
            g_init_error = 1;
            return;
        }
        memcpy(copy, provider, INTERFACE_TABLE_OFFSET + slots * sizeof(void *));
        DeviceCreateFn *table = (DeviceCreateFn *)(copy + INTERFACE_TABLE_OFFSET);
        g_real_device_create[p] = table[DEVICE_CREATE_SLOT];
        table[DEVICE_CREATE_SLOT] = g_wrappers[p];
        g_patched[p] = copy;
    }
    g_count = count;
}

__attribute__((visibility("default"))) QnnErrorHandle
QnnInterface_getProviders(const void ***providers, uint32_t *count) {
    pthread_once(&g_once, initialize);
    if (g_init_error != 0) return g_init_error;
    *providers = g_patched;
    *count = g_count;
    return 0;
}

/* Lets Python tell the bridge from the real library and report which one is in use. */
__attribute__((visibility("default"))) const char *quantnpu_qnn_bridge_version(void) {
    return "quantnpu-qnn-htp-bridge 1 (custom device config union 4 -> 8)";
}

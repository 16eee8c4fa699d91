// SPDX-License-Identifier: MIT OR GPL-2.0
/* Times every URB that goes through vhci-hcd, at four points of the client kernel's path:
 *
 *   ENQUEUE   vhci_urb_enqueue()          usbcore hands the URB to vhci
 *   TX        usbip_pack_pdu(CMD_SUBMIT)  vhci_tx_loop builds its CMD_SUBMIT, just before
 *                                         kernel_sendmsg() to our socket
 *   RX        usbip_pack_pdu(RET_SUBMIT)  vhci_rx_loop has read our RET_SUBMIT header and
 *                                         unpacks it into the URB
 *   GIVEBACK  usb_hcd_giveback_urb()      the URB goes back to the class driver
 *
 * Every event carries the USB/IP seqnum and devid, the key the client's own records use. The
 * seqnum only exists from TX on (vhci assigns it in vhci_tx_urb, which is inlined), so ENQUEUE
 * is remembered by URB pointer and sent at TX; GIVEBACK is matched by URB pointer from RX.
 * usbip_pack_pdu is exported by usbip-core and therefore never inlined into vhci, unlike the
 * static vhci_send_cmd_submit / vhci_recv_ret_submit. The event layout is mirrored in
 * client-ebpf/src/event.rs.
 */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "kernel.h"

#define EV_ENQUEUE 1
#define EV_TX 2
#define EV_RX 3
#define EV_GIVEBACK 4

struct urb_event {
	__u64 ts_ns;
	__u32 kind;
	__u32 seqnum;
	__u32 devid;
	__u32 pipe;
	__u32 length;
	__s32 status;
};

struct urb_key {
	__u32 seqnum;
	__u32 devid;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} EVENTS SEC(".maps");

/* URB pointer -> enqueue time. LRU: URBs vhci answers itself (SET_ADDRESS, a port that went
 * away) never reach TX and would otherwise stay forever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} ENQUEUED SEC(".maps");

/* URB pointer -> its seqnum/devid, from RX until GIVEBACK. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct urb_key);
} RETURNED SEC(".maps");

/* Events the ring buffer had no room for; userspace reports them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} LOST SEC(".maps");

static __always_inline void emit(__u64 ts, __u32 kind, __u32 seqnum, __u32 devid, __u32 pipe,
				 __u32 length, __s32 status)
{
	struct urb_event *e = bpf_ringbuf_reserve(&EVENTS, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&LOST, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return;
	}
	e->ts_ns = ts;
	e->kind = kind;
	e->seqnum = seqnum;
	e->devid = devid;
	e->pipe = pipe;
	e->length = length;
	e->status = status;
	bpf_ringbuf_submit(e, 0);
}

SEC("kprobe/vhci_urb_enqueue")
int BPF_KPROBE(on_enqueue, void *hcd, struct urb *urb)
{
	__u64 key = (__u64)urb;
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&ENQUEUED, &key, &now, BPF_ANY);
	return 0;
}

SEC("kprobe/usbip_pack_pdu")
int BPF_KPROBE(on_pack_pdu, struct usbip_header *pdu, struct urb *urb, int cmd, int pack)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 key = (__u64)urb;
	__u32 seqnum = 0, devid = 0;
	bpf_probe_read_kernel(&seqnum, sizeof(seqnum), &pdu->base.seqnum);
	bpf_probe_read_kernel(&devid, sizeof(devid), &pdu->base.devid);
	__u32 pipe = BPF_CORE_READ(urb, pipe);

	if (cmd == USBIP_CMD_SUBMIT && pack) {
		/* vhci's tx side (usbip-host's stub unpacks CMD_SUBMIT: pack == 0). */
		__u32 length = BPF_CORE_READ(urb, transfer_buffer_length);
		__u64 *enqueued = bpf_map_lookup_elem(&ENQUEUED, &key);
		if (enqueued) {
			emit(*enqueued, EV_ENQUEUE, seqnum, devid, pipe, length, 0);
			bpf_map_delete_elem(&ENQUEUED, &key);
		}
		emit(now, EV_TX, seqnum, devid, pipe, length, 0);
	} else if (cmd == USBIP_RET_SUBMIT && !pack) {
		/* vhci's rx side (the stub packs RET_SUBMIT: pack == 1). */
		__s32 status = 0, actual = 0;
		bpf_probe_read_kernel(&status, sizeof(status), &pdu->ret_submit.status);
		bpf_probe_read_kernel(&actual, sizeof(actual), &pdu->ret_submit.actual_length);
		struct urb_key k = { .seqnum = seqnum, .devid = devid };
		bpf_map_update_elem(&RETURNED, &key, &k, BPF_ANY);
		emit(now, EV_RX, seqnum, devid, pipe, (__u32)actual, status);
	}
	return 0;
}

SEC("kprobe/usb_hcd_giveback_urb")
int BPF_KPROBE(on_giveback, void *hcd, struct urb *urb, int status)
{
	__u64 key = (__u64)urb;
	struct urb_key *k = bpf_map_lookup_elem(&RETURNED, &key);
	if (!k)
		return 0; /* not a vhci URB we saw come back */
	__u64 now = bpf_ktime_get_ns();
	__u32 seqnum = k->seqnum, devid = k->devid;
	bpf_map_delete_elem(&RETURNED, &key);
	emit(now, EV_GIVEBACK, seqnum, devid, BPF_CORE_READ(urb, pipe),
	     BPF_CORE_READ(urb, actual_length), status);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* The few kernel structures the probes read, declared by hand.
 *
 * `struct urb` lives in vmlinux BTF on the guest kernel (Debian 6.1), so its fields are read
 * with CO-RE: `preserve_access_index` makes clang record each access as a relocation that the
 * loader (aya) rewrites against the running kernel's BTF. Only the fields we read are listed.
 *
 * `struct usbip_header` is private to drivers/usb/usbip (its BTF is in the usbip_core module,
 * which aya cannot relocate against), but it is the USB/IP wire format: packed 32-bit words
 * whose offsets cannot change without breaking every peer. So it is declared with its fixed
 * layout and read without relocations. See drivers/usb/usbip/usbip_common.h.
 */
#ifndef P2P_USB_KERNEL_H
#define P2P_USB_KERNEL_H

#include <linux/types.h>

struct urb {
	void *hcpriv;
	unsigned int pipe;
	int status;
	__u32 transfer_buffer_length;
	__u32 actual_length;
} __attribute__((preserve_access_index));

struct usbip_header_basic {
	__u32 command;
	__u32 seqnum;
	__u32 devid;
	__u32 direction;
	__u32 ep;
} __attribute__((packed));

struct usbip_header_ret_submit {
	__s32 status;
	__s32 actual_length;
	__s32 start_frame;
	__s32 number_of_packets;
	__s32 error_count;
} __attribute__((packed));

struct usbip_header {
	struct usbip_header_basic base;
	struct usbip_header_ret_submit ret_submit; /* the union's RET_SUBMIT member */
} __attribute__((packed));

#define USBIP_CMD_SUBMIT 0x0001
#define USBIP_RET_SUBMIT 0x0003

#endif
